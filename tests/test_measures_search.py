"""The σ / α search: it hits the target drop; its parts (crossing, common random numbers).
Fast vs faithful agreement on the demo study's models: test_measures_demo_agreement.py.

Precision notes (measured on these digits CNNs, see benchmarks/measures_fast_vs_faithful.py):
the training accuracy of one perturbed model varies by ~0.06 from one perturbation to the
next, so a single faithful search (10 perturbations per step) carries ~0.02 of Monte-Carlo
noise in its drop, i.e. ~10% in σ. The test against the target therefore raises the sample
counts (same algorithm, larger sizes).
"""

from __future__ import annotations

import math

import pytest
import torch

from qgen_ray.measures import compute_measures, folded_weights
from qgen_ray.measures.forward import CleanPredictions
from qgen_ray.measures.perturb import FAMILIES
from qgen_ray.measures.search import FlatnessSearch, crossing_radius, protocol_for, stream_seed
from tests.support.oracles import fresh_drops
from tests.support.toy import digits, tiny_cnn, train_tiny

TARGET = 0.1
# sd of the drop at the radius one search returns, from its own sizes (96 directions, 256
# images): the fresh 120-draw means at 8 seeds' radii spread by 0.011 (1 thread), of which
# 0.007 is their own sampling error.
SEARCH_DROP_SD = 0.008

# (width, epochs, weight decay) of small digits CNNs
TOY_MODELS = [(8, 3, 0.0), (8, 10, 1e-3), (8, 20, 0.0)]


@pytest.fixture(scope="module")
def data():
    return digits(600, seed=0)


@pytest.fixture(scope="module")
def models(data):
    x, y = data
    return [
        train_tiny(tiny_cnn(width, seed=0), x, y, epochs=epochs, weight_decay=wd)
        for width, epochs, wd in TOY_MODELS
    ]


@pytest.mark.statistical
@pytest.mark.parametrize("name", ["pacbayes_mag_init", "sharpness_init"])
def test_fresh_noise_at_returned_radius_drops_accuracy_by_target(models, data, name, stat_seed):
    """The fast search with 96 perturbations (64 restarts) and a ±0.005 band (its default
    sizes leave ~0.015 of noise, the paper's ~0.02), re-evaluated with 120 fresh ones on
    all 600 images. Allowed: the band plus 4 standard errors of the fresh mean (measured
    here from the 120 drops, ~0.007) combined with the search's own error in drop units
    (SEARCH_DROP_SD), so ~0.05. A search aiming at a drop of 0.2 misses by twice that."""
    x, y = data
    model, init = models[2]
    overrides = dict(samples=96, restarts=64, tolerance=0.005)
    (row,) = compute_measures(
        model, init, x, y, names=[name], protocol_overrides=overrides, seed=stat_seed
    )
    assert row["converged"]
    drops = fresh_drops(model, x, y, name.rsplit("_", 1)[0], row["sigma"], 120, 99 + stat_seed)
    fresh_se = float(drops.std()) / len(drops) ** 0.5
    allowed = overrides["tolerance"] + 4 * (fresh_se**2 + SEARCH_DROP_SD**2) ** 0.5
    assert abs(float(drops.mean()) - TARGET) <= allowed, (float(drops.mean()), allowed)


def test_crossing_radius_inverts_a_power_law_drop_curve():
    """On an exact drop = c·r^k curve the log-log secant is exact, whichever probes bracket
    the target; without a probe on each side the last probe's radius stands."""
    target, root, k = 0.1, 0.05, 2.3

    def curve(r: float) -> float:
        return target * (r / root) ** k

    steps = [(r, curve(r)) for r in (0.001, 0.2, 0.03, 0.07, 0.048)]
    assert crossing_radius(steps, target) == pytest.approx(root, rel=1e-12)
    steps.append((0.0, 0.0))  # a zero drop has no logarithm: ignored
    assert crossing_radius(steps, target) == pytest.approx(root, rel=1e-12)
    below_only = [(r, curve(r)) for r in (0.01, 0.02, 0.049)]
    assert crossing_radius(below_only, target) == 0.049


def _pacbayes_search(model, data, protocol) -> FlatnessSearch:
    """A Gaussian σ search on `model` reading the training images in their given order."""
    x, y = data
    folded, layout, w = folded_weights(model)
    clean = CleanPredictions(folded, layout, w, x, y, torch.arange(x.shape[0]))
    return FlatnessSearch(FAMILIES["pacbayes"], protocol, folded, layout, w, x, y, clean, 0)


def test_fast_search_returns_the_crossing_of_its_probes(models, data):
    result = _pacbayes_search(models[2][0], data, protocol_for("fast")).run()
    assert result.converged and result.radius == crossing_radius(result.steps, TARGET)
    probed = [r for r, _ in result.steps]
    assert min(probed) <= result.radius <= max(probed)


def test_common_random_numbers_and_antithetic_directions(models, data):
    fast = protocol_for("fast", samples=6, antithetic=True)
    search = _pacbayes_search(models[0][0], data, fast)
    d = search.directions()
    assert torch.equal(d[3:], -d[:3]) and search.directions() is d  # drawn once (CRN)
    twin = _pacbayes_search(models[0][0], data, fast)
    assert torch.equal(twin.directions(), d)  # from the seeded stream, not the global one
    paper = _pacbayes_search(models[0][0], data, protocol_for("faithful"))
    assert not torch.equal(paper.directions(), paper.directions())  # fresh every step


def _written_out_probe(search: FlatnessSearch, radius: float, clean_all) -> tuple[float, str, int]:
    """`probe`'s sequential rule written out: every per-image drop of the (common-random-
    number) perturbations up to the cap at once, then the looks 8, 16, 32, ... replayed on
    them. Returns (drop, verdict, images read)."""
    from qgen_ray.measures.forward import ForwardCounter, correct_predictions

    p, n = search.protocol, search.x.shape[0]
    flat = search.perturbed_weights(radius)
    cap = min(n, p.max_images)
    index = search.order[:cap]
    correct = correct_predictions(
        search.model, search.layout, flat, search.x, search.y, ForwardCounter(), index=index
    ).float()
    clean = clean_all[index].float()
    d_all = clean - correct.mean(0)
    looks = [p.first_chunk]
    while looks[-1] < cap:
        looks.append(min(cap, 2 * looks[-1]))
    for seen in looks:
        d = d_all[:seen]
        drop = float(d.mean())
        if seen == cap:
            verdict = "in_band" if abs(drop - p.target) <= p.tolerance else (
                "too_high" if drop > p.target else "too_low")  # fmt: skip
            return drop, verdict, seen
        se = max(float(d.std()), p.sd_floor) / seen**0.5 * (1 - seen / n) ** 0.5
        if abs(drop - p.target) <= p.tolerance and p.z * se <= p.tolerance:
            return drop, "in_band", seen
        if drop - p.z * se > p.target:
            return drop, "too_high", seen
        if drop + p.z * se < p.target:
            return drop, "too_low", seen
    raise AssertionError("unreachable")


PROBES = [(128, r) for r in (0.0, 0.04, 0.044, 0.046, 0.048, 0.052, 0.1)] + [
    (512, r) for r in (0.042, 0.045, 0.047, 0.049)
]


@pytest.mark.parametrize("cap, radius", PROBES)
def test_probe_reads_doubling_looks_and_stops_where_the_rule_says(models, data, cap, radius):
    """Looks of 8, 16, 32, ... images up to the cap (128 or 512 of 600; at 512 the finite
    population correction matters): each radius must return the written-out rule's drop
    and verdict after reading exactly as many images. On this model the radii stop after
    8 (too low / too high), 64, 128 or 256 (too low) and at the cap (in band / too high)."""
    from qgen_ray.measures.forward import ForwardCounter, correct_predictions

    protocol = protocol_for("fast", samples=6, first_chunk=8, max_images=cap, stratify=False,
                            batched=False, sd_floor=0.05)  # fmt: skip
    model = models[1][0]
    search = _pacbayes_search(model, data, protocol)
    x, y = data
    clean_all = correct_predictions(
        search.model, search.layout, search.w[None], x, y, ForwardCounter()
    )[0]
    want_drop, want_verdict, want_seen = _written_out_probe(search, radius, clean_all)
    before = search.counter.images
    drop, verdict = search.probe(radius)
    assert (drop, verdict) == (pytest.approx(want_drop, abs=1e-12), want_verdict)
    # each perturbation reads each image once; the clean model reads each image once
    assert search.counter.images - before == protocol.samples * want_seen + want_seen


class _CurveSearch(FlatnessSearch):
    """The bisection alone: each probe returns drop(r) from a known curve, no noise."""

    def __init__(self, curve, protocol):
        self.curve, self.protocol, self.counter = curve, protocol, None

    def probe(self, radius):
        drop = self.curve(radius)
        return drop, self._decide(drop, 0.0)

    def run(self):
        import types

        self.counter = types.SimpleNamespace(images=0)
        return super().run()


def test_faithful_bisection_hand_worked():
    """drop(r) = r / 2, target 0.1 ± 0.01 in [0, 2]: r = 1 (0.5 high), 0.5 (0.25 high),
    0.25 (0.125 high), 0.125 (0.0625 low), 0.1875 (0.09375: in band)."""
    result = _CurveSearch(lambda r: r / 2, protocol_for("faithful")).run()
    assert [r for r, _ in result.steps] == [1.0, 0.5, 0.25, 0.125, 0.1875]
    assert result.converged and result.radius == 0.1875 and result.drop == 0.09375


def test_faithful_bracket_grows_while_nothing_overshoots():
    """drop(r) = r / 100: every step falls short until r > 10; the upper end becomes 4 r
    after each short step, so σ* = 10 is found although the bracket starts at [0, 2]."""
    result = _CurveSearch(lambda r: r / 100, protocol_for("faithful", iterations=40)).run()
    assert result.converged and abs(result.drop - 0.1) <= 0.01
    assert [r for r, _ in result.steps][:3] == [1.0, 2.5, 6.25]  # mids of [0,2],[1,4],[2.5,10]


def test_fast_search_lands_on_a_power_law_crossing():
    """drop(r) = 0.1 (r / 0.05)^2 in log space with the secant: the secant through two
    measured ends of a power law hits r* = 0.05 exactly; refine reports that crossing."""
    fast = protocol_for("fast")
    result = _CurveSearch(lambda r: 0.1 * (r / 0.05) ** 2, fast).run()
    assert result.converged and result.radius == pytest.approx(0.05, rel=1e-9)
    first = [r for r, _ in result.steps][:2]
    assert first[0] == pytest.approx((1e-6 * 2.0) ** 0.5)  # geometric midpoint first
    assert len(result.steps) < 15


def test_faithful_sharpness_ascends_from_each_restart_with_its_own_batches(models, data):
    """The paper's sharpness step: K random starts, each climbed by the ascent on its own
    freshly drawn mini-batches (written out here from the primitives and the same stream)."""
    import math

    from qgen_ray.measures.perturb import ascend

    protocol = protocol_for("faithful", restarts=3, ascent_steps=4, ascent_batch=250)
    x, y = data
    folded, layout, w = folded_weights(models[0][0])
    clean = CleanPredictions(folded, layout, w, x, y, torch.arange(x.shape[0]))
    family = FAMILIES["sharpness"]

    def search():
        return FlatnessSearch(family, protocol, folded, layout, w, x, y, clean, 5)

    searching = search()
    got = searching.perturbed_weights(0.05)
    again = searching.perturbed_weights(0.05)  # the next step: fresh starts and batches
    ref = search()
    half_width = family.scale(0.05, w)
    need = protocol.ascent_steps * protocol.ascent_batch
    for step in (got, again):
        u = half_width * ref.directions()
        rows = []
        for j in range(3):
            perms = [torch.randperm(len(x), generator=ref.gen)
                     for _ in range(math.ceil(need / len(x)))]  # fmt: skip
            idx = torch.cat(perms)[:need].reshape(protocol.ascent_steps, protocol.ascent_batch)
            batches = [(x[i], y[i]) for i in idx]
            rows.append(ascend(folded, layout, w, u[j : j + 1], half_width, batches,
                               protocol.ascent_lr, ref.counter))  # fmt: skip
        assert step.shape == (3, layout.numel)
        torch.testing.assert_close(step, w + torch.cat(rows), rtol=0, atol=1e-7)


def test_protocol_for_checks_its_knobs():
    from qgen_ray.errors import UserError

    with pytest.raises(UserError) as err:
        protocol_for("fast", lower=0.0)
    assert str(err.value) == "a log-space search needs a lower bracket end > 0; set lower=1e-6"
    assert protocol_for("faithful", lower=0.0).lower == 0.0  # linear bisection may start at 0
    for knob in ("samples", "restarts", "iterations"):
        with pytest.raises(UserError) as err:
            protocol_for("faithful", **{knob: 0})
        assert str(err.value) == "samples, restarts and iterations must be at least 1"
    one = protocol_for("faithful", samples=1, restarts=1, iterations=1)
    assert (one.samples, one.restarts, one.iterations) == (1, 1, 1)


def test_stream_seed_is_the_first_8_sha256_bytes_little_endian_halved():
    import hashlib

    digest = hashlib.sha256(b"3:sharpness").digest()
    assert stream_seed(3, "sharpness") == int.from_bytes(digest[:8], "little") >> 1


def test_directions_and_ascent_batches_come_from_the_familys_own_stream(models, data):
    """Common random numbers: the K directions are the family's draw from the generator
    seeded by stream_seed(seed, family), made once; the ascent batches are drawn once too
    (the next draws of the same stream), so two probes see the same perturbations."""
    import math

    x, y = data
    folded, layout, w = folded_weights(models[0][0])
    clean = CleanPredictions(folded, layout, w, x, y, torch.arange(x.shape[0]))
    family = FAMILIES["sharpness"]
    fast = protocol_for("fast", restarts=3, ascent_steps=2, ascent_batch=700, batched=False)
    search = FlatnessSearch(family, fast, folded, layout, w, x, y, clean, 4)
    gen = torch.Generator().manual_seed(stream_seed(4, "sharpness"))
    want = family.directions(3, layout.numel, gen, x.device)
    assert torch.equal(search.directions(), want) and search.directions() is search.directions()
    need = 2 * 700
    perms = [torch.randperm(len(x), generator=gen) for _ in range(math.ceil(need / len(x)))]
    idx = torch.cat(perms)[:need].reshape(2, 700)
    batches = search.ascent_batches()
    assert search.ascent_batches() is batches
    for (bx, by), i in zip(batches, idx, strict=True):
        assert torch.equal(bx, x[i]) and torch.equal(by, y[i])
    first = search.perturbed_weights(0.02)
    assert torch.equal(first, search.perturbed_weights(0.02))  # the same climb, twice


def test_crossing_radius_edge_cases():
    # a probe exactly at the target counts as "above": the crossing is that probe's radius
    assert crossing_radius([(0.2, 0.1), (0.1, 0.05)], 0.1) == pytest.approx(0.2)
    # the closest probes either side at the same radius: out of order, the last probe wins
    assert crossing_radius([(0.2, 0.05), (0.2, 0.2), (0.3, 0.5)], 0.1) == 0.3


def _decider(**knobs) -> _CurveSearch:
    """A search whose `_decide` uses binary-exact knobs: target 0.5 ± 0.25, z = 2."""
    return _CurveSearch(None, protocol_for("faithful", target=0.5, tolerance=0.25, z=2.0, **knobs))


@pytest.mark.parametrize(
    "drop, se, verdict",
    [
        (0.75, 0.0, "in_band"),  # |drop − target| = tolerance: in the band
        (0.25, 0.0, "in_band"),
        (0.8, 0.0, "too_high"),
        (0.2, 0.0, "too_low"),
        (0.6, 1.0, None),  # in band but z·SE = 2 > tolerance, and the interval spans it
        (0.5, 0.125, "in_band"),  # z·SE = tolerance exactly: decided
        (1.0, 0.25, None),  # drop − z·SE = target exactly: not yet above it
        (0.0, 0.25, None),  # drop + z·SE = target exactly: not yet below it
        (1.1, 0.25, "too_high"),
        (-0.1, 0.25, "too_low"),
    ],
)
def test_decide_at_the_boundaries(drop, se, verdict):
    assert _decider()._decide(drop, se) == verdict


def _search_at(**knobs) -> _CurveSearch:
    return _CurveSearch(None, protocol_for("fast", **knobs))


def test_next_radius_hand_worked():
    lo, hi = 1e-3, 1e-1
    mid = math.sqrt(lo * hi)
    s = _search_at()
    # secant through (1e-3, 0.01) and (1e-1, 0.4): t = ln(10) / ln(40)
    t = math.log(10) / math.log(40)
    secant = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
    assert s.next_radius(lo, hi, 0.01, 0.4, 1) == pytest.approx(secant, rel=1e-12)
    # t clamped into [0.1, 0.9] of the log bracket
    low_t = math.exp(math.log(lo) + 0.1 * (math.log(hi) - math.log(lo)))
    high_t = math.exp(math.log(lo) + 0.9 * (math.log(hi) - math.log(lo)))
    assert s.next_radius(lo, hi, 0.099, 100.0, 1) == pytest.approx(low_t, rel=1e-12)
    assert s.next_radius(lo, hi, 1e-9, 0.1000001, 1) == pytest.approx(high_t, rel=1e-12)
    # the geometric midpoint whenever the secant is not trusted
    for args in [
        (None, 0.4, 1),  # an end unmeasured
        (0.01, None, 1),
        (0.0, 0.4, 1),  # no logarithm of 0
        (0.4, 0.4, 1),  # not increasing
        (0.01, 0.4, 2),  # the same end moved twice in a row
    ]:
        assert s.next_radius(lo, hi, *args) == pytest.approx(mid, rel=1e-12), args
    assert s.next_radius(lo, hi, 0.5, 0.9, 1) != pytest.approx(mid)  # 0.5 < 0.9 but > target
    assert _search_at(interpolate=False).next_radius(lo, hi, 0.01, 0.4, 1) == pytest.approx(mid)
    linear = _CurveSearch(None, protocol_for("faithful"))
    assert linear.next_radius(0.5, 1.5, 0.01, 0.4, 1) == 1.0


def _replayed_radii(curve, p) -> list[float]:
    """The bisection of `FlatnessSearch.run` written out from its documentation: probe
    `next_radius`; too high moves hi (and marks the target overshot), else lo moves up
    and, while nothing overshot, hi grows to 4 r when 4 r > hi; the secant is refused
    after the same end moved twice in a row."""
    lo, hi, lo_d, hi_d, overshot, moves, radii = p.lower, p.upper, None, None, False, [], []
    probe = _CurveSearch(curve, p)
    for _ in range(p.iterations):
        same_twice = len(moves) >= 2 and moves[-1] == moves[-2]
        r = probe.next_radius(lo, hi, lo_d, hi_d, 2 if same_twice else 1)
        radii.append(r)
        drop, verdict = probe.probe(r)
        if verdict == "in_band":
            break
        if verdict == "too_high":
            hi, hi_d, overshot = r, drop, True
            moves.append("hi")
        else:
            lo, lo_d = r, drop
            moves.append("lo")
            if not overshot and 4 * r > hi:
                hi, hi_d = 4 * r, None
    return radii


@pytest.mark.parametrize(
    "name, curve",
    [
        # steep and convex in log-log: the secant lands short twice (lo moves twice in a
        # row: r = 0.037, 0.0495), so the next probe is the geometric midpoint 0.0513
        ("creeping", lambda r: min(1.0, 0.1 * math.exp((r / 0.05 - 1) * 20))),
        # the first probe already overshoots: lo is still unmeasured
        ("overshoot-first", lambda r: min(1.0, 0.1 * (r / 1e-4) ** 0.5)),
        # nothing overshoots at first: the bracket grows past 2
        ("far", lambda r: min(1.0, 0.1 * (r / 7.0) ** 3)),
    ],
)
def test_fast_bisection_follows_its_rule(name, curve):
    fast = protocol_for("fast", iterations=25)
    result = _CurveSearch(curve, fast).run()
    assert [r for r, _ in result.steps] == pytest.approx(_replayed_radii(curve, fast), rel=1e-12)
    assert result.converged and abs(curve(result.radius) - 0.1) < 0.011, name
    assert 0.0 <= result.seconds < 60.0
