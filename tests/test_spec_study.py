"""TrainSpec ids and study grids: stable ids, the paper's grid sizes, bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qgen_ray.errors import UserError
from qgen_ray.pipeline.study import NIN_LR_GRID, Study, nin_population
from qgen_ray.spec import TrainSpec


def test_model_id_is_stable_and_depends_only_on_science():
    a = TrainSpec(dataset="digits", model="nin", width=1, depth=2)
    b = TrainSpec.from_dict(a.to_dict())
    assert a.model_id == b.model_id and len(a.model_id) == 16
    assert TrainSpec(dataset="digits", model="nin", width=2, depth=2).model_id != a.model_id


def test_reference_model_ids_never_change():
    """Every store ever written is keyed by these hashes: a change to the hashing rule, a
    field's default or the serialization would orphan them all. The first model of the
    paper's NiN grid on CIFAR-10, and a quantized demo model (late fields at default)."""
    paper = nin_population("cifar10", [2, 3, 4]).specs()[0]
    assert (paper.width, paper.depth, paper.optimizer, paper.lr, paper.bits) == (
        8,
        2,
        "sgd",
        0.1,
        32,
    )
    assert paper.model_id == "d2cfa8081b884ec0"
    demo = TrainSpec(dataset="digits", model="nin", width=1, depth=2, epochs=12, batch_size=64,
                     milestones=(6, 9), augment=False, optimizer="sgd", lr=0.1, method="lsq",
                     bits=4)  # fmt: skip
    assert demo.model_id == "fc0568bd8bb955a0"
    assert TrainSpec.from_dict({**demo.to_dict(), "lr_schedule": "cosine"}).model_id != (
        demo.model_id
    )


def test_spec_rejects_impossible_precisions():
    with pytest.raises(UserError, match="bits=32"):
        TrainSpec(dataset="digits", model="nin", bits=4, method="fp32")
    with pytest.raises(UserError, match="outside 2..8"):
        TrainSpec(dataset="digits", model="nin", bits=1, method="lsq")
    with pytest.raises(UserError, match="sgd, adam, rmsprop"):
        TrainSpec(dataset="digits", model="nin", optimizer="lamb")


def test_paper_nin_grid_has_243_models_per_precision():
    plan = nin_population("cifar10", [2, 3, 4]).plan()
    assert len(plan) == 972
    per_bits = {}
    for spec, extra in plan:
        per_bits[spec.bits] = per_bits.get(spec.bits, 0) + 1
        assert spec.lr == NIN_LR_GRID[spec.optimizer][extra["lr_rank"]]
    assert per_bits == {32: 243, 8: 243, 4: 243, 2: 243}
    assert len({s.model_id for s, _ in plan}) == 972
    assert nin_population("cifar100", [3, 4, 5]).axes == [
        "lr_rank",
        "optimizer",
        "weight_decay",
        "width",
        "depth",
        "bits",
    ]


def test_unknown_hyperparameter_is_one_clear_error():
    study = Study(name="x", dataset="digits", model="nin", grid={"widht": [1]})
    with pytest.raises(UserError, match="unknown hyperparameter.*widht"):
        study.plan()


def test_smoke_is_a_corner_of_the_grid():
    study = Study(
        name="x",
        dataset="digits",
        model="nin",
        grid={"width": [1, 2, 3]},
        smoke_grid={"width": [1]},
        smoke_protocol={"epochs": 1},
    )
    assert len(study.smoke().plan()) == 4 and all(s.epochs == 1 for s in study.smoke().specs())


def test_smoke_stage_options_go_over_the_studys_per_stage():
    study = Study(
        name="x",
        dataset="digits",
        model="nin",
        grid={"width": [1]},
        stage_options={"measure": {"mode": "faithful"}, "landscape": {"steps": 11}},
        smoke_stage_options={
            "measure": {"measures": ["weight_norm"]},
            "corrupt": {"severities": [1]},
        },
    )
    assert study.smoke().stage_options == {
        "measure": {"mode": "faithful", "measures": ["weight_norm"]},
        "landscape": {"steps": 11},
        "corrupt": {"severities": [1]},
    }
    assert study.stage_options == {"measure": {"mode": "faithful"}, "landscape": {"steps": 11}}
    with pytest.raises(UserError, match="no option 'stepz'"):  # checked like the study's own
        replace(study, smoke_stage_options={"landscape": {"stepz": 3}}).smoke().plan()


@pytest.mark.parametrize(
    "declaration, fragment",
    [
        (dict(stages=("train", "measures")), "unknown stage 'measures' in stages; valid: train"),
        (
            dict(stage_options={"landscape": {"stepz": 11}}),
            "stage 'landscape' has no option 'stepz'; valid: models, per_precision, steps",
        ),
        (
            dict(stage_options={"report": {"x": 1}}),
            "'report', which is not a stage with options; valid: measure, corrupt, landscape",
        ),
        (dict(grid={"optimizer": ["sgd", "lion"]}), "unknown optimizer 'lion'"),
    ],
)
def test_study_declaration_is_checked_whole_by_plan(declaration, fragment):
    study = Study(name="x", dataset="digits", model="nin", grid={"width": [1]})
    study.plan()  # the valid declaration plans
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        Study(**{**study.__dict__, **declaration}).plan()


def test_every_study_scripts_stage_options_are_valid():
    from tests.support.fixtures import REPO, load_script

    for script in sorted((REPO / "studies").glob("*.py")):
        module = load_script(script.stem)
        for study in getattr(module, "STUDIES", ()) or (getattr(module, "STUDY", None),):
            if study is not None:  # a search checks its space and stages instead
                study.check() if hasattr(study, "check") else study.plan()
