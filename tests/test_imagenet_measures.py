"""Measures and landscapes of an ImageFolder (ImageNet) study: the training images are
read from disk through the model's evaluation transform (`FolderImages`), only those the
search indexes, and give exactly the rows the in-memory path gives on the same images;
`qgen measure` / `qgen landscape` run on a fine-tuned fixture study through a real local
Ray; bad roots are one line with nothing written.

Fixtures: a 2-class ImageFolder of 40-px JPEGs and the two smoke models (resnet18 FP32 and
LSQ-2) of studies/corruption_imagenet.py, fine-tuned in this process by `finetune`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qgen_ray import cli, schema
from qgen_ray.imagenet.folder_images import FolderImages, folder_labels
from qgen_ray.imagenet.imagefolder import image_folder
from qgen_ray.measures import compute_measures
from qgen_ray.pipeline.collect import collect
from qgen_ray.pipeline.jobs import training_images
from qgen_ray.store import StudyStore
from qgen_ray.train.finetune import FinetuneOptions, finetune
from tests.support.fixtures import load_script, save_weights, write_imagefolder

SIZE = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("if") / "data", classes=2, train=24, val=2)


def _all(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_folder_images_are_the_transformed_images_read_once(folder):
    dataset = image_folder(folder, "train", SIZE, augment=False, model="resnet18")
    x = FolderImages(dataset, threads=2, cache_images=8)
    every = _all(dataset)
    assert x.shape == every.shape == (48, 3, SIZE, SIZE) and len(x) == 48
    index = torch.tensor([5, 0, 47, 5, 12])
    assert torch.equal(x[index], every[index])  # repeats and order kept
    assert torch.equal(x[3:9], every[3:9])
    decoded = x.decoded
    assert decoded == 4 + 5  # each distinct image once (5 was read by the first call)
    view = x.to("cpu")
    assert torch.equal(view[torch.tensor([7, 8])], every[7:9]) and x.decoded == decoded  # cached
    x[torch.arange(20, 40)]  # 20 new images: the cache keeps the 8 newest
    assert torch.equal(x[torch.tensor([39])], every[39:40]) and x.decoded == decoded + 20
    x[torch.tensor([0])]  # long gone: decoded again
    assert x.decoded == decoded + 21
    assert torch.equal(folder_labels(dataset), torch.tensor([0] * 24 + [1] * 24))
    mask = torch.zeros(48, dtype=torch.bool)
    mask[[2, 30]] = True
    assert torch.equal(x[mask], every[mask])  # a mask selects, as on a tensor
    assert torch.equal(x[torch.tensor(7)], every[7]) and torch.equal(x[8], every[8])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 2),
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["fast", "faithful"])
def test_measures_from_disk_equal_the_in_memory_path(folder, mode):
    """The lazy reading is a speed trick: same images, same random numbers, same rows."""
    item = {"model": "resnet18", "image_size": SIZE}
    x, y = training_images(None, item, torch.device("cpu"), {"root": str(folder), "threads": 2})
    every = _all(x.dataset)
    model, init = _net(), _net()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    names = ["pacbayes_init", "sharpness_orig", "weight_norm"]
    small = {"iterations": 4, "samples": 4, "restarts": 2, "ascent_steps": 2, "pool_max": 16,
             "ascent_batch": 4}  # fmt: skip
    if mode == "fast":
        small.update(max_images=8)
    rows = [compute_measures(model, init, xs, y, names, mode=mode, protocol_overrides=small)
            for xs in (x, every)]  # fmt: skip
    for lazy, memory in zip(*rows, strict=True):
        assert {k: v for k, v in lazy.items() if k != "seconds"} == {
            k: v for k, v in memory.items() if k != "seconds"
        }
    if mode == "fast":  # the margin pool, the probes' prefix and the ascent batches only
        assert 16 <= x.decoded < len(every)


# -- the stages on a fine-tuned fixture study, through a real local Ray ------------------

STUDY_NAME = "corruption_imagenet-smoke"


@pytest.fixture(scope="module")
def study(tmp_path_factory, folder):
    import ray

    tmp = tmp_path_factory.mktemp("inm")
    store = StudyStore(str(tmp / "storage" / STUDY_NAME))
    options = FinetuneOptions(
        store=store.root, data_root=str(folder), weights=str(save_weights(tmp / "r18.pt"))
    )
    specs = load_script("corruption_imagenet").STUDY.smoke().specs()
    for spec in specs:
        finetune(spec, options, torch.device("cpu"))
    collect(store)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield {"store": store, "data": folder, "ids": sorted(s.model_id for s in specs)}
    ray.shutdown()


@pytest.mark.slow
def test_qgen_measure_and_landscape_run_on_the_imagenet_study(study, capsys):
    store, root = study["store"], str(study["data"])
    argv = ["measure", store.root, "--data-root", root, "--measures", "pacbayes_init",
            "weight_norm", "--device", "cpu"]  # fmt: skip
    cli.main(argv)
    measures = store.read_table(schema.MEASURES)
    assert sorted(measures["model_id"].unique()) == study["ids"]
    assert len(measures) == 4 and measures["value"].notna().all()
    searched = measures[measures["measure"] == "pacbayes_init"]
    assert (searched["sigma"] > 0).all() and (searched["forward_images"] > 0).all()
    cli.main(argv)  # a re-run finds them measured
    assert "0 to measure" in capsys.readouterr().out
    cli.main(["landscape", store.root, "--data-root", root, "--steps", "3", "--device", "cpu"])
    surfaces = store.read_table(schema.LANDSCAPES)
    assert sorted(surfaces["model_id"].unique()) == study["ids"]  # one per precision
    assert len(surfaces) == 2 * 9 and surfaces["loss"].notna().all()
    assert "on at most 1000 training images" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, root, message",
    [
        ("measure", "{tmp}/nowhere", "is not a folder"),
        ("landscape", "{three}", "has 3 classes but the models output 2"),
        ("measure", "{empty}", "has no class folders"),
    ],
)
def test_bad_roots_are_one_line_with_nothing_written(study, tmp_path, capsys, stage, root, message):
    three = write_imagefolder(tmp_path / "three", classes=3, train=1, val=1, size=16)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    store = study["store"]
    before = {t: store.read_table(t) for t in (schema.MEASURES, schema.LANDSCAPES)}
    argv = [stage, store.root, "--data-root", root.format(tmp=tmp_path, three=three,
                                                          empty=tmp_path / "empty")]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and message in err, err
    for table, old in before.items():
        new = store.read_table(table)
        assert new is None if old is None else new.equals(old)
