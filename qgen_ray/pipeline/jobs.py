"""Per-item work of the follow-up jobs, free of Ray: measure one model, build one
corrupted set, evaluate one model on corrupted sets (in memory, or ImageNet-C from disk),
compute one loss landscape.

Each job is `fn(store, data, item, device, **kwargs) -> list of table rows` (`data` is
None for jobs that read their images from disk), looked up by name in `JOBS`;
`qgen_ray.ray.fanout` runs them on Ray actors, a notebook can call them directly.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qgen_ray.data.base import ImageData
from qgen_ray.loaders import load_model
from qgen_ray.registry import Registry
from qgen_ray.store import StudyStore
from qgen_ray.train.evaluate import evaluate
from qgen_ray.train.loop import resolve_device

JOBS: Registry[Callable[..., list[dict]]] = Registry("job")
CORRUPTED_DIR = "corrupted"  # <study>/corrupted/<dataset>/<corruption>/<severity>.npy
CORRUPTION_SEED = 0  # seed of on-the-fly corruptions (same images every time)


def _plain_model(store: StudyStore, model_id: str, which: str, device: torch.device):
    """The model as the function it computes: quantizers replaced by w_hat (docs/method.md §3)."""
    from qgen_ray.quant import materialize

    return materialize(load_model(store.uri, model_id, which)).to(device).eval()


@JOBS.register("measure")
def measure_one(
    store: StudyStore,
    data: ImageData | None,
    item: dict,
    device: str,
    *,
    names: list[str],
    mode: str,
    seed: int,
    folder: dict | None = None,
) -> list[dict]:
    """Sharpness / PAC-Bayes measures of one model on its full training set (read from
    disk for an ImageFolder study: `folder`, see `training_images`)."""
    from qgen_ray.measures import compute_measures

    dev = resolve_device(device)
    model, init, x, y = measure_inputs(store, data, item["model_id"], dev, item, folder)
    rows = compute_measures(model, init, x, y, names=names, mode=mode, seed=seed, device=dev)
    return [{"model_id": item["model_id"], **r} for r in rows]


def measure_inputs(
    store: StudyStore,
    data: ImageData | None,
    model_id: str,
    device: torch.device,
    item: dict | None = None,
    folder: dict | None = None,
):
    """What the measures of one model read: its trained and initial models as plain
    functions, and the normalized training set (no augmentation)."""
    model = _plain_model(store, model_id, "final", device)
    init = _plain_model(store, model_id, "init", device)
    return model, init, *training_images(data, item, device, folder)


def training_images(
    data: ImageData | None,
    item: dict | None,
    device: torch.device,
    folder: dict | None = None,
    images: int | None = None,
    seed: int = 0,
):
    """(x, y): the training set as the model is evaluated on it, normalized.

    In-memory datasets: the whole set as one tensor on `device`. An ImageFolder study
    (`data` None, `folder` = {"root", "threads"}, `item` with the model's "model" and
    "image_size"): its train/ split read lazily through the model's evaluation transform
    (`FolderImages`: only the images the caller indexes are decoded). `images`: a seeded
    random subset of at most that many (None: all), from a folder decoded once into one
    tensor on `device`."""
    if folder is None:
        x, y = data.train_x, data.train_y
        keep = _subset(len(y), images, seed)
        if keep is not None:
            x, y = x[keep], y[keep]
        return data.normalize(x.to(device)), y.to(device)
    from torch.utils.data import Subset

    from qgen_ray.imagenet.folder_images import CACHE_IMAGES, FolderImages, folder_labels
    from qgen_ray.imagenet.imagefolder import image_folder

    dataset = image_folder(
        folder["root"], "train", int(item["image_size"]), augment=False, model=item["model"]
    )
    y = folder_labels(dataset)
    keep = _subset(len(y), images, seed)
    if keep is not None:
        dataset, y = Subset(dataset, keep.tolist()), y[keep]
    x = FolderImages(dataset, device, threads=folder["threads"], cache_images=CACHE_IMAGES)
    if images is not None:  # a subset read over and over (a landscape): decoded once, held
        x = x[:]
    return x, y.to(device)


def _subset(n: int, images: int | None, seed: int) -> torch.Tensor | None:
    """A seeded random choice of `images` of n indices (None: all of them)."""
    if images is None or images >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:images]


def corruption_cache(store: StudyStore) -> Path:
    """Where generated corrupted sets live: in the study folder when it is local."""
    if store.is_local:
        return Path(store.path(CORRUPTED_DIR))
    return Path(tempfile.gettempdir()) / "qgen-corrupted" / store.name


def corrupted_images(
    store: StudyStore, data: ImageData, corruption: str, severity: int, corrupt_root: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The corrupted test set as uint8 [N, C, H, W] + labels: a published set when
    `corrupt_root` is given (CIFAR-10-C layout), else generated and cached once."""
    from qgen_ray.data.corruption_readers import read_cifar_c
    from qgen_ray.data.corruptions import corrupted_set

    if corrupt_root:
        images, labels = read_cifar_c(corrupt_root, corruption, severity)
    else:
        nhwc = data.test_x.permute(0, 2, 3, 1).contiguous().numpy()
        images, labels = corrupted_set(
            corruption_cache(store),
            nhwc,
            data.test_y.numpy(),
            data.name,
            corruption,
            severity,
            seed=CORRUPTION_SEED,
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.as_tensor(labels, dtype=torch.int64)


@JOBS.register("corrupt_prepare")
def prepare_corruption(
    store: StudyStore, data: ImageData, item: dict, device: str, *, corrupt_root: str | None
) -> list[dict]:
    """Build (or find) one corrupted set so that evaluation jobs only read it."""
    corrupted_images(store, data, item["corruption"], item["severity"], corrupt_root)
    return []


@JOBS.register("corrupt")
def corrupt_one(
    store: StudyStore,
    data: ImageData,
    item: dict,
    device: str,
    *,
    sets: list[list],
    corrupt_root: str | None,
) -> list[dict]:
    """Loss and accuracy of one model on every corrupted set in `sets`; gap = corrupted
    loss - clean training loss (docs/method.md §6)."""
    dev = resolve_device(device)
    model = load_model(store.uri, item["model_id"], "final").to(dev)
    rows = []
    for corruption, severity in sets:
        x, y = corrupted_images(store, data, corruption, severity, corrupt_root)
        rows.append(
            _corruption_row(item, corruption, severity, *evaluate(model, x, y, data.normalize))
        )
    return rows


def _corruption_row(item: dict, corruption: str, severity: int, loss: float, acc: float) -> dict:
    """One corruptions.parquet row; gap = corrupted loss - clean training loss."""
    return {
        "model_id": item["model_id"],
        "corruption": corruption,
        "severity": int(severity),
        "loss": loss,
        "accuracy": acc,
        "gap": loss - item["train_loss"],
    }


@JOBS.register("corrupt_imagenet")
def corrupt_imagenet_one(
    store: StudyStore,
    data: None,
    item: dict,
    device: str,
    *,
    sets: list[list],
    corrupt_root: str,
    class_to_idx: dict[str, int],
    num_workers: int,
) -> list[dict]:
    """`corrupt` for an ImageNet model: every ImageNet-C set in `sets`, read from disk
    (`data` is None) through its recipe's eval transform at its `image_size`."""
    from qgen_ray.imagenet.imagenet_c import evaluate_imagenet_c

    dev = resolve_device(device)
    model = load_model(store.uri, item["model_id"], "final").to(dev)
    size = int(item["image_size"])
    return [
        _corruption_row(
            item,
            corruption,
            severity,
            *evaluate_imagenet_c(
                model,
                corrupt_root,
                corruption,
                severity,
                class_to_idx,
                item["model"],
                size,
                dev,
                num_workers=num_workers,
            ),
        )
        for corruption, severity in sets
    ]


@JOBS.register("landscape")
def landscape_one(
    store: StudyStore,
    data: ImageData | None,
    item: dict,
    device: str,
    *,
    steps: int,
    span: float,
    seed: int,
    folder: dict | None = None,
    images: int | None = None,
) -> list[dict]:
    """Filter-normalized 2-D loss surface of one model on its training set, or on a
    seeded subset of `images` of it (docs/method.md §5)."""
    from qgen_ray.measures import loss_landscape

    dev = resolve_device(device)
    model = _plain_model(store, item["model_id"], "final", dev)
    x, y = training_images(data, item, dev, folder, images=images, seed=seed)
    surface = loss_landscape(model, x, y, steps=steps, span=span, seed=seed)
    surface.insert(0, "model_id", item["model_id"])
    return surface.to_dict("records")
