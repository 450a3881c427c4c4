"""Follow-up stages on a real store through a real local Ray: measure, corrupt,
landscape, report; idempotent re-runs; bad input through the `qgen` CLI."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from qgen_ray import cli, schema
from qgen_ray.data import load_image_data
from qgen_ray.pipeline.collect import collect
from qgen_ray.pipeline.followups import corrupt_study, landscape_study, measure_study, report_study
from qgen_ray.spec import TrainSpec
from qgen_ray.store import StudyStore
from qgen_ray.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Four one-epoch digits NiNs (FP32 and LSQ 8/4/2) in a real study store."""
    import ray

    torch.set_num_threads(1)
    store = StudyStore(str(tmp_path_factory.mktemp("store") / "mini"))
    data = load_image_data("digits")
    for method, bits in (("fp32", 32), ("lsq", 8), ("lsq", 4), ("lsq", 2)):
        spec = TrainSpec(
            dataset="digits",
            model="nin",
            width=1,
            depth=2,
            epochs=1,
            batch_size=64,
            bits=bits,
            method=method,
            augment=False,
        )
        trial = store.trial(spec.model_id)
        trial.write_result(train(spec, data, trial))
    collect(store)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield store
    ray.shutdown()


def test_measure_stage_writes_rows_and_skips_them_on_rerun(study, capsys):
    names = ["pacbayes_init", "pacbayes_orig", "weight_norm"]
    measure_study(study, measures=names)
    table = study.read_table(schema.MEASURES)
    assert len(table) == 12 and set(table["measure"]) == set(names)
    assert list(table.columns) == schema.MEASURES_COLUMNS
    searched = table[table["measure"] != "weight_norm"]
    assert (searched["sigma"] > 0).all() and (searched["forward_images"] > 0).all()
    # one search serves both PAC-Bayes bounds: the same sigma for init and orig
    per_model = searched.pivot(index="model_id", columns="measure", values="sigma")
    assert (per_model["pacbayes_init"] == per_model["pacbayes_orig"]).all()
    capsys.readouterr()
    measure_study(study, measures=names)
    assert "0 to measure" in capsys.readouterr().out
    assert study.read_table(schema.MEASURES).equals(table)


def test_corrupt_stage_gap_is_corrupted_loss_minus_clean_train_loss(study, capsys):
    corrupt_study(study, corruptions=["gaussian_noise", "contrast"], severities=[1, 5])
    table = study.read_table(schema.CORRUPTIONS)
    assert len(table) == 4 * 2 * 2 and list(table.columns) == schema.CORRUPTIONS_COLUMNS
    trials = study.read_table(schema.TRIALS).set_index("model_id")
    expected = table["loss"] - trials.loc[table["model_id"], "train_loss"].to_numpy()
    assert (table["gap"] - expected).abs().max() < 1e-9
    worst = table.groupby("severity")["loss"].mean()
    assert worst[5] > worst[1]  # severity 5 hurts more than severity 1
    assert (study.path("corrupted") != "") and study.exists("corrupted/digits/contrast/5.npy")
    _assert_rows_recomputed_from_the_cached_images(study, table)
    capsys.readouterr()
    corrupt_study(study, corruptions=["gaussian_noise", "contrast"], severities=[1, 5])
    assert "0 models to evaluate" in capsys.readouterr().out


def _assert_rows_recomputed_from_the_cached_images(store: StudyStore, table: pd.DataFrame):
    """Every row's loss and accuracy, recomputed from the cached .npy (uint8 NHWC) by hand:
    (x / 255 − mean) / std with the digits' statistics, the kept model, mean cross-entropy
    against the test labels; and the cache holds the corruption of the test images."""
    import numpy as np
    import torch.nn.functional as F

    from qgen_ray import load_model
    from qgen_ray.data.corruptions import corrupt_images
    from qgen_ray.pipeline.jobs import CORRUPTION_SEED

    data = load_image_data("digits")
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    clean = data.test_x.permute(0, 2, 3, 1).numpy()
    for (corruption, severity), rows in table.groupby(["corruption", "severity"]):
        cached = np.load(store.path(f"corrupted/digits/{corruption}/{severity}.npy"))
        made = corrupt_images(clean, corruption, int(severity), seed=CORRUPTION_SEED)
        assert np.array_equal(cached, made) and not np.array_equal(cached, clean)
        x = (torch.from_numpy(cached).permute(0, 3, 1, 2).float() / 255 - mean) / std
        for row in rows.itertuples():
            with torch.no_grad():
                logits = load_model(store.uri, row.model_id).eval()(x)
            loss = float(F.cross_entropy(logits, data.test_y))
            acc = float((logits.argmax(1) == data.test_y).double().mean())
            assert row.loss == pytest.approx(loss, rel=1e-5), (corruption, severity)
            assert row.accuracy == pytest.approx(acc, abs=1e-12)


def test_landscape_and_report(study):
    if not study.exists(schema.CORRUPTIONS):  # run alone: the report needs its table
        corrupt_study(study, corruptions=["gaussian_noise"], severities=[1])
    landscape_study(study, steps=5)
    surf = study.read_table(schema.LANDSCAPES)
    assert surf["model_id"].nunique() == 4 and len(surf) == 4 * 25
    centre = surf[(surf["x"] == 0) & (surf["y"] == 0)].set_index("model_id")["loss"]
    trials = study.read_table(schema.TRIALS).set_index("model_id")
    assert (centre - trials.loc[centre.index, "train_loss"]).abs().max() < 1e-3
    report = report_study(study)
    text = open(report).read()
    assert "Table 1" in text and "Table 4" in text and "fig2_landscape" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["measure", "{dir}", "--measures", "sharpness_nope"], "valid names"),
        (["measure", "{dir}", "--mode", "slow"], "fast"),
        (["corrupt", "{dir}", "--corruptions", "rain"], "gaussian_noise"),
        (["corrupt", "{dir}", "--severities", "6"], "1..5"),
        (["corrupt", "{dir}", "--corrupt-root", "{dir}/nowhere"], "corrupt-root"),
        (["report", "{empty}"], "no trials.parquet"),
        (["measure", "{empty}"], "no trials"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(study, tmp_path, capsys, argv, message):
    argv = [a.format(dir=study.root, empty=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and message in err, err


def test_status_reads_the_store(study, capsys):
    cli.main(["status", study.root])
    out = capsys.readouterr().out
    assert "4/" in out and "ok 4" in out
    assert isinstance(pd.read_parquet(study.path(schema.TRIALS)), pd.DataFrame)


def test_missing_checkpoint_is_one_line_exit_2(study, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(study.root, copy)
    model_id = study.read_table(schema.TRIALS)["model_id"].iloc[0]
    (copy / schema.TRIALS_DIR / model_id / schema.FINAL_CKPT).unlink()
    with pytest.raises(SystemExit) as exc:
        cli.main(["measure", str(copy)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and "lack init.pt or final.pt" in err, err
    assert "re-run the study script" in err
