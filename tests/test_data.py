"""Datasets: digits split, CIFAR on-disk format, batched augmentation vs torchvision."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from scipy.stats import chisquare

from qgen_ray import load_dataset
from qgen_ray.data import DATASETS, load_image_data
from qgen_ray.data.augment import random_crop_flip
from qgen_ray.errors import UserError


def test_digits_split_is_fixed_stratified_and_disjoint():
    a, b = load_image_data("digits"), load_image_data("digits")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.num_train + len(a.test_x) == 1797
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape[1:] == (1, 16, 16)
    assert set(a.test_y.tolist()) == set(range(10))  # stratified: every class in test
    flat = lambda x: {bytes(img.numpy().tobytes()) for img in x}  # noqa: E731
    assert len(flat(a.train_x) & flat(a.test_x)) <= 2  # (the digits set has a few duplicates)


def test_load_dataset_normalizes_like_evaluation():
    ds = load_dataset("digits", "train")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2


def test_cifar_reads_the_pickle_layout(cifar10_root):
    data = load_image_data("cifar10", str(cifar10_root))
    assert data.train_x.shape == (100, 3, 32, 32) and data.test_x.shape == (20, 3, 32, 32)
    assert data.num_classes == 10 and data.crop_padding == 4 and data.flip


def test_cifar_images_are_pixel_exact_against_the_pickles_they_came_from(cifar10_root):
    """The published layout, read here by hand: each row of a batch's `data` is 1024 red,
    then 1024 green, then 1024 blue bytes, each plane row-major 32x32; the train set is
    data_batch_1..5 in order."""
    folder = cifar10_root / "cifar-10-batches-py"

    def read(names):
        batches = [pickle.loads((folder / n).read_bytes()) for n in names]
        x = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([b["labels"] for b in batches])
        return torch.from_numpy(x), torch.from_numpy(y)

    data = load_image_data("cifar10", str(cifar10_root))
    train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = read(["test_batch"])
    assert torch.equal(data.train_x, train_x) and torch.equal(data.train_y, train_y)
    assert torch.equal(data.test_x, test_x) and torch.equal(data.test_y, test_y)


def test_cifar_missing_or_incomplete_folder_is_one_clear_error(tmp_path, cifar10_root):
    with pytest.raises(UserError, match="--data-root"):
        load_image_data("cifar10", None)
    with pytest.raises(UserError, match="missing or incomplete"):
        load_image_data("cifar10", str(tmp_path / "nowhere"))
    (cifar10_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3"):
        load_image_data("cifar10", str(cifar10_root))


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UserError, match="cifar10, cifar100, digits"):
        DATASETS.get("mnist")


def _all_torchvision_outputs(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every image RandomCrop(padding=pad) + RandomHorizontalFlip can produce."""
    h, w = img.shape[-2:]
    padded = TF.pad(img, [pad])
    outs = []
    for dy, dx, flip in itertools.product(range(2 * pad + 1), range(2 * pad + 1), (0, 1)):
        crop = padded[..., dy : dy + h, dx : dx + w]
        outs.append(crop.flip(-1) if flip else crop)
    return outs


def _category(sample: torch.Tensor, outs: list[torch.Tensor]) -> int:
    return next(i for i, o in enumerate(outs) if torch.equal(o, sample))


@pytest.mark.statistical
def test_batched_crop_flip_matches_torchvision_in_distribution(stat_seed):
    """Same support and the same (uniform) law over the 5x5x2 crop/flip outcomes: a
    chi-square test of 5000 draws each, rejecting at p < 1e-4 (a false alarm once in
    5000 runs for the two tests; a law that never flips, or never shifts by the full pad,
    gives p < 1e-100)."""
    g = torch.Generator().manual_seed(stat_seed)
    img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g)
    pad, n = 2, 5000
    outs = _all_torchvision_outputs(img, pad)
    assert len({o.numpy().tobytes() for o in outs}) == len(outs)  # outcomes distinguishable
    ours = random_crop_flip(img.expand(n, -1, -1, -1), pad, True, g)
    ours_counts = np.bincount([_category(s, outs) for s in ours], minlength=len(outs))
    torch.manual_seed(stat_seed)
    tv = T.Compose([T.RandomCrop(8, padding=pad), T.RandomHorizontalFlip()])
    tv_counts = np.bincount([_category(tv(img), outs) for _ in range(n)], minlength=len(outs))
    for counts in (ours_counts, tv_counts):
        assert chisquare(counts).pvalue > 1e-4  # both uniform over the same outcomes
    assert ours_counts.sum() == n


def test_no_augmentation_path_is_identity():
    data = load_image_data("digits")
    x = data.train_x[:8]
    assert data.augment(x) is x


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_each_cifar_variant_reads_its_labels_classes_and_statistics(tmp_path, monkeypatch, variant):
    """CIFAR-100's pickles hold `fine_labels` and 100 classes; each variant normalizes with
    its own published channel statistics (pixel/255)."""
    from torchvision import datasets
    from torchvision.datasets import cifar as tv_cifar

    from qgen_ray.data import cifar
    from tests.support.fixtures import write_cifar_fixture

    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    root = write_cifar_fixture(tmp_path / variant, variant, per_batch=4, seed=3)
    folder = root / getattr(datasets, variant.upper()).base_folder
    key = "labels" if variant == "cifar10" else "fine_labels"
    test_batch = pickle.loads(
        (folder / "test_batch" if variant == "cifar10" else folder / "test").read_bytes()
    )
    data = load_image_data(variant, str(root))
    assert data.name == variant and data.num_classes == (10 if variant == "cifar10" else 100)
    assert data.test_y.dtype == torch.int64 and data.test_y.tolist() == test_batch[key]
    mean, std = {
        "cifar10": (cifar.CIFAR10_MEAN, cifar.CIFAR10_STD),
        "cifar100": (cifar.CIFAR100_MEAN, cifar.CIFAR100_STD),
    }[variant]
    assert (data.mean, data.std) == (mean, std)
    loader = {"cifar10": cifar.load_cifar10, "cifar100": cifar.load_cifar100}[variant]
    again = loader(str(root))
    assert again.name == variant and torch.equal(again.test_x, data.test_x)
    with pytest.raises(UserError, match="missing or incomplete"):  # never downloads unasked
        loader(str(tmp_path / "nowhere"))


def test_cifar_that_fails_torchvisions_checksum_is_one_clear_error(tmp_path):
    """The fixture's files are not the published ones: torchvision's MD5 check (not
    bypassed here) refuses them, and the user is told to re-download."""
    from qgen_ray.data.cifar import load_cifar10
    from tests.support.fixtures import write_cifar_fixture

    root = write_cifar_fixture(tmp_path / "cifar")
    with pytest.raises(UserError, match="integrity check") as err:
        load_cifar10(str(root))
    assert str(err.value).endswith("; re-download it with --download into an empty folder")
    with pytest.raises(UserError, match="^cifar10 needs --data-root DIR") as err:
        load_cifar10(None)
    assert str(err.value).endswith("; add --download to fetch it there")
