"""The ImageNet half of the distortion study: ImageNet-C evaluation of fine-tuned models
through a real local Ray (rows, gap arithmetic, labels through the clean classes, skipped
re-runs), the bad-input lines of `qgen corrupt` and of studies/corruption_imagenet.py.

Fixtures: a 2-class ImageFolder of 40-px JPEGs, an ImageNet-C folder made from its val
images with the real corruption code (one set lacks class 0, so labels must come from
the clean set's classes), and the study's two smoke models (resnet18 FP32 and LSQ-2)
fine-tuned in this process by `finetune` (no process group, no Ray Train).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qgen_ray import cli, schema
from qgen_ray.imagenet.recipe import model_transform
from qgen_ray.loaders import load_model
from qgen_ray.pipeline.collect import collect
from qgen_ray.pipeline.followups import Placement, corrupt_study
from qgen_ray.store import StudyStore
from qgen_ray.train.finetune import FinetuneOptions, finetune
from tests.support.fixtures import (
    load_script,
    save_weights,
    write_imagefolder,
    write_imagenet_c,
)

pytestmark = pytest.mark.slow

STUDY_NAME = "corruption_imagenet-smoke"
# (corruption, severity) -> classes written; brightness 5 lacks class 0 on purpose.
CLASSES = ("n00000000", "n00000001")
SETS = {
    ("gaussian_noise", 1): CLASSES,
    ("gaussian_noise", 5): CLASSES,
    ("brightness", 1): CLASSES,
    ("brightness", 5): CLASSES[1:],
    ("contrast", 1): CLASSES,
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The smoke models of studies/corruption_imagenet.py in a real store, a local Ray."""
    import ray

    tmp = tmp_path_factory.mktemp("inc")
    data = write_imagefolder(tmp / "data", classes=2, train=4, val=2)
    weights = save_weights(tmp / "r18.pt")
    store = StudyStore(str(tmp / "storage" / STUDY_NAME))
    options = FinetuneOptions(store=store.root, data_root=str(data), weights=str(weights))
    specs = load_script("corruption_imagenet").STUDY.smoke().specs()
    for spec in specs:
        finetune(spec, options, torch.device("cpu"))
    collect(store)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield {
        "store": store,
        "data": data,
        "c": write_imagenet_c(tmp / "imagenet-c", data / "val", SETS),
        "storage": tmp / "storage",
        "ids": [s.model_id for s in specs],
    }
    ray.shutdown()


@pytest.fixture
def table_restored(study):
    """Whatever a test does to the module's shared corruptions table, the next test sees it
    as it was before (tests run in any order)."""
    store = study["store"]
    before = store.read_table(schema.CORRUPTIONS)
    yield
    if before is None:
        Path(store.path(schema.CORRUPTIONS)).unlink(missing_ok=True)
    else:
        store.write_table(schema.CORRUPTIONS, before)


def _corrupt(study, **kw):
    place = Placement(data_root=str(study["data"]), device="cpu")
    return corrupt_study(study["store"], corrupt_root=str(study["c"]), place=place, **kw)


def test_rows_gap_and_labels_through_the_clean_classes(study):
    _corrupt(study, corruptions=["gaussian_noise", "brightness"], severities=[1, 5])
    store = study["store"]
    table = store.read_table(schema.CORRUPTIONS)
    assert list(table.columns) == schema.CORRUPTIONS_COLUMNS and len(table) == 2 * 2 * 2
    assert set(table["model_id"]) == set(study["ids"])
    trials = store.read_table(schema.TRIALS).set_index("model_id")
    expected = table["loss"] - trials.loc[table["model_id"], "train_loss"].to_numpy()
    assert (table["gap"] - expected).abs().max() < 1e-9
    assert table["accuracy"].between(0, 1).all() and (table["loss"] > 0).all()

    # brightness 5 holds only class 1: recompute one model's loss image by image
    model_id = study["ids"][1]
    model = load_model(store.root, model_id)
    transform = model_transform(
        trials.loc[model_id, "model"], int(trials.loc[model_id, "image_size"]), train=False
    )
    files = sorted((study["c"] / "brightness" / "5" / CLASSES[1]).glob("*.JPEG"))
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        loss = F.cross_entropy(model(x), torch.ones(len(files), dtype=torch.int64))
    row = table[(table["model_id"] == model_id) & (table["corruption"] == "brightness")]
    assert row.set_index("severity").loc[5, "loss"] == pytest.approx(float(loss), rel=1e-5)


def test_a_rerun_skips_finished_models(study, capsys, table_restored):
    store = study["store"]
    kw = dict(corruptions=["gaussian_noise", "brightness"], severities=[1, 5])
    _corrupt(study, **kw)  # in any test order: the table holds these sets (computed once)
    table = store.read_table(schema.CORRUPTIONS)
    a, b = study["ids"]
    marked = (table["model_id"] == a) & (table["corruption"] == "gaussian_noise")
    table.loc[marked, "loss"] = 123.0  # a recomputation would overwrite this
    store.write_table(schema.CORRUPTIONS, table)
    capsys.readouterr()
    _corrupt(study, **kw)
    assert "0 models to evaluate" in capsys.readouterr().out
    assert store.read_table(schema.CORRUPTIONS).equals(table)

    missing = (table["model_id"] == b) & (table["severity"] == 5)
    store.write_table(schema.CORRUPTIONS, table[~missing].reset_index(drop=True))
    _corrupt(study, **kw)
    assert "1 models to evaluate" in capsys.readouterr().out
    key = ["model_id", "corruption", "severity"]
    after = store.read_table(schema.CORRUPTIONS).set_index(key).sort_index()
    after = after[after.index.get_level_values("corruption").isin(kw["corruptions"])]
    assert len(after) == 8 and (after.loc[a].loc["gaussian_noise", "loss"] == 123.0).all()
    before = table.set_index(key).sort_index()
    assert after.loc[b, "loss"].equals(before.loc[b, "loss"])  # recomputed: the same values


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data-root", "{data}"], "pass --corrupt-root DIR"),
        (["--data-root", "{data}", "--corrupt-root", "{c}/nowhere"], "is not a folder"),
        (["--corrupt-root", "{c}"], "pass --data-root DIR"),
        (["--data-root", "{data}", "--corrupt-root", "{c}", "--severities", "1", "3"], "3"),
        (["--data-root", "{three}", "--corrupt-root", "{c}"], "has 3 classes"),
    ],
)
def test_qgen_corrupt_bad_input_is_one_line_before_any_work(
    study, tmp_path, capsys, flags, message
):
    three = write_imagefolder(tmp_path / "three", classes=3, train=1, val=1, size=16)
    fill = {"data": study["data"], "c": study["c"], "three": three}
    argv = ["corrupt", study["store"].root, "--corruptions", "gaussian_noise", "--severities", "1"]
    argv += [f.format(**fill) for f in flags]
    before = study["store"].read_table(schema.CORRUPTIONS)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and message in err, err
    if message == "3":  # the missing severity folder is named
        assert f"missing folder {study['c'] / 'gaussian_noise' / '3'}" in err, err
    after = study["store"].read_table(schema.CORRUPTIONS)
    assert after is None if before is None else after.equals(before)  # nothing written


def test_study_script_runs_the_corrupt_and_report_stages(study, capsys, table_restored):
    script = load_script("corruption_imagenet")
    base = ["--smoke", "--storage", str(study["storage"]), "--data-root", str(study["data"])]
    outputs = script.main(
        [*base, "--stages", "corrupt", "report", "--corrupt-root", str(study["c"]),
         "--corruptions", "contrast", "--severities", "1", "--quiet"]
    )  # fmt: skip
    assert "2 models to evaluate" in capsys.readouterr().out
    table = study["store"].read_table(schema.CORRUPTIONS)
    assert set(table.loc[table["corruption"] == "contrast", "model_id"]) == set(study["ids"])
    assert Path(outputs["corrupt"]).name == schema.CORRUPTIONS
    assert "Tables 4-6: corrupted data" in Path(outputs["report"]).read_text()


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "pass --corrupt-root DIR"),
        (["--corrupt-root", "{c}", "--severities", "2"], "gaussian_noise/2"),
        (["--corrupt-root", "{c}", "--corruptions", "rain"], "unknown corruption 'rain'"),
    ],
)
def test_study_script_checks_imagenet_c_before_training(study, tmp_path, capsys, flags, message):
    weights = save_weights(tmp_path / "r18.pt")
    argv = [
        "--smoke",
        "--storage",
        str(tmp_path / "store"),
        "--data-root",
        str(study["data"]),
        "--weights",
        f"resnet18={weights}",
        *(f.format(c=study["c"]) for f in flags),
    ]
    with pytest.raises(SystemExit) as exc:
        load_script("corruption_imagenet").main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and message in err, err
    assert not (tmp_path / "store").exists()  # nothing trained, nothing written


def test_the_study_is_the_paper_grid_with_imagenet_finetune_ids():
    study = load_script("corruption_imagenet").STUDY
    finetune_cnns = load_script("imagenet_finetune").CNNS
    specs = study.specs()
    assert len(specs) == 12 and study.stages == ("train", "corrupt", "report")
    assert {s.model for s in specs} == {"resnet18", "mobilenet_v2", "resnet50"}
    assert {(s.method, s.bits) for s in specs} == {("fp32", 32), ("lsq", 8), ("lsq", 4), ("lsq", 2)}
    assert [s.model_id for s in specs] == [s.model_id for s in finetune_cnns.specs()]
