"""compute_measures: rows, names, errors, determinism, one search per family."""

from __future__ import annotations

import math

import pytest

from qgen_ray.errors import UserError
from qgen_ray.measures import MEASURES, compute_measures
from qgen_ray.schema import MEASURES_COLUMNS
from tests.support.toy import digits, tiny_cnn, train_tiny

ROW_KEYS = [c for c in MEASURES_COLUMNS if c != "model_id"]


@pytest.fixture(scope="module")
def setup():
    x, y = digits(300, seed=2)
    model, init = train_tiny(tiny_cnn(4, seed=2), x, y, epochs=8)
    return model, init, x, y


def _without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_all_measures_rows_have_schema_keys_and_consistent_values(setup):
    model, init, x, y = setup
    rows = compute_measures(model, init, x, y)
    assert [r["measure"] for r in rows] == MEASURES.names()
    for r in rows:
        assert list(r) == ROW_KEYS
        if r["measure"] == "weight_norm":
            continue
        assert r["mode"] == "fast" and isinstance(r["converged"], bool)
        assert r["flatness"] == pytest.approx(1 / r["sigma"] ** 2)
        assert r["forward_images"] > 0 and math.isfinite(r["value"])
    by = {r["measure"]: r for r in rows}
    for family in ("pacbayes", "pacbayes_mag", "sharpness", "sharpness_mag"):
        assert by[f"{family}_init"]["sigma"] == by[f"{family}_orig"]["sigma"]


def test_one_search_serves_both_bounds(setup):
    model, init, x, y = setup
    both = compute_measures(model, init, x, y, names=["pacbayes_orig", "pacbayes_init"])
    (alone,) = compute_measures(model, init, x, y, names=["pacbayes_init"])
    assert [r["measure"] for r in both] == ["pacbayes_orig", "pacbayes_init"]
    assert both[0]["sigma"] == both[1]["sigma"] == alone["sigma"]
    assert both[0]["forward_images"] + both[1]["forward_images"] == alone["forward_images"]


def test_deterministic_given_seed(setup):
    model, init, x, y = setup
    names = ["pacbayes_mag_init", "sharpness_orig"]
    a = compute_measures(model, init, x, y, names=names, seed=3)
    b = compute_measures(model, init, x, y, names=names, seed=3)
    c = compute_measures(model, init, x, y, names=names, seed=4)
    assert _without_seconds(a) == _without_seconds(b)
    assert [r["sigma"] for r in a] != [r["sigma"] for r in c]


def test_faithful_mode_row(setup):
    model, init, x, y = setup
    (row,) = compute_measures(model, init, x, y, names=["pacbayes_init"], mode="faithful")
    assert row["mode"] == "faithful"
    # every faithful step reads the whole training set 10 times; +1 pass for the clean model
    steps = (row["forward_images"] - x.shape[0]) / (10 * x.shape[0])
    assert steps == int(steps) and 1 <= steps <= 15


def test_untrained_model_does_not_converge():
    x, y = digits(200, seed=3)
    model = tiny_cnn(4, seed=3).eval()  # chance accuracy: a 0.1 drop is out of reach
    (row,) = compute_measures(model, model, x, y, names=["pacbayes_init"])
    assert row["converged"] is False


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(names=["pacbayes"]), "valid names: pacbayes_init"),
        (dict(mode="slow"), "valid modes: faithful, fast"),
    ],
)
def test_user_errors_list_the_valid_choices(setup, kwargs, fragment):
    model, init, x, y = setup
    with pytest.raises(UserError, match=fragment):
        compute_measures(model, init, x, y, **kwargs)


def test_mismatched_inputs_are_user_errors(setup):
    model, _, x, y = setup
    with pytest.raises(UserError, match="initialization model"):
        compute_measures(model, tiny_cnn(5), x, y, names=["weight_norm"])
    with pytest.raises(UserError, match="labels"):
        compute_measures(model, model, x, y[:-1], names=["weight_norm"])
