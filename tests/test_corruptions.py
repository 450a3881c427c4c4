"""Corrupted data: names, seeded generation, the cache and the published-set readers."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qgen_ray.data.corruption_readers import read_cifar_c, read_imagenet_c
from qgen_ray.data.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    cache_path,
    corrupt_images,
    corrupted_set,
    validate,
)
from qgen_ray.errors import UserError


def _images(n: int, side: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth random images (a gradient plus texture), so blurs visibly change them."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, side, dtype=np.float32)[None, :, None, None]
    noise = rng.integers(0, 56, size=(n, side, side, channels))
    return (ramp + noise).astype(np.uint8)


# ---------------------------------------------------------------- names and validation


def test_corruptions_are_the_papers_fifteen_in_order():
    assert len(CORRUPTIONS) == 15 and len(set(CORRUPTIONS)) == 15
    assert CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "jpeg_compression"
    assert CORRUPTIONS.index("glass_blur") == 4 and CORRUPTIONS.index("frost") == 8
    assert SEVERITIES == (1, 2, 3, 4, 5)
    validate(CORRUPTIONS, SEVERITIES)
    validate("fog", 3)


def test_unknown_corruption_lists_valid_names():
    with pytest.raises(
        UserError, match=r"unknown corruption 'speckle'.*gaussian_noise, shot_noise"
    ):
        validate(["fog", "speckle"], [1])


@pytest.mark.parametrize("severity", [0, 6, -1, True, 2.0])
def test_bad_severity(severity):
    with pytest.raises(UserError, match="severities from 1 to 5"):
        validate(["fog"], [severity])


def test_corrupt_images_validates_and_checks_dtype():
    with pytest.raises(UserError, match="unknown corruption"):
        corrupt_images(_images(1, 32), "rain", 1, seed=0)
    with pytest.raises(UserError, match="outside 1..5"):
        corrupt_images(_images(1, 32), "fog", 7, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt_images(_images(1, 32).astype(np.float32), "fog", 1, seed=0)
    for shape in [(1, 32, 32, 2), (32, 32, 3)]:  # two channels; no batch axis
        with pytest.raises(ValueError, match="C in \\(1, 3\\)"):
            corrupt_images(np.zeros(shape, np.uint8), "fog", 1, seed=0)


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("corruption", ["gaussian_noise", "impulse_noise", "glass_blur", "frost"])
def test_same_seed_is_byte_identical_and_other_seed_differs(corruption):
    images = _images(3, 32)
    first = corrupt_images(images, corruption, 3, seed=7)
    again = corrupt_images(images, corruption, 3, seed=7)
    other = corrupt_images(images, corruption, 3, seed=8)
    assert first.tobytes() == again.tobytes()
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, images)
    # per-image seeds: identical inputs at different positions get different noise
    same = np.repeat(images[:1], 2, axis=0)
    noisy = corrupt_images(same, corruption, 3, seed=7)
    assert not np.array_equal(noisy[0], noisy[1])


_DIGEST_SOURCE = """
import hashlib
import numpy as np
from qgen_ray.data.corruptions import corrupt_images

def digest():
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    names = ["gaussian_noise", "impulse_noise", "frost", "elastic_transform"]
    outputs = [corrupt_images(images, name, 3, seed=5).tobytes() for name in names]
    return hashlib.sha256(b"".join(outputs)).hexdigest()
"""


def test_identical_in_another_process():
    """Seeds are a stable function of their inputs (no salted `hash()`): Ray workers agree."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONHASHSEED": "random"}
    script = _DIGEST_SOURCE + "print(digest())"
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    here: dict = {}
    exec(_DIGEST_SOURCE, here)
    assert child.stdout.strip() == here["digest"]()


def test_caller_rng_state_is_restored():
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    corrupt_images(_images(2, 32), "gaussian_noise", 2, seed=0)
    assert (np.random.random(), random.random()) == expected


@pytest.mark.statistical
def test_severity_increases_noise(stat_seed):
    """Mean |noise| over 12,288 pixel values per severity: imagecorruptions' sd rises by
    1.46-1.5x a severity (0.08, 0.12, 0.18, 0.26, 0.38 of the range; the clipping at 0
    and 255 trims the last steps to 1.32-1.36x over seeds 0-5), while the mean's own
    sampling error is < 1% of it: each step must show a rise of at least 20%."""
    images = np.full((4, 32, 32, 3), 128, np.uint8)
    spread = [
        np.abs(corrupt_images(images, "gaussian_noise", s, seed=stat_seed).astype(int) - 128).mean()
        for s in SEVERITIES
    ]
    assert all(b > 1.2 * a for a, b in zip(spread, spread[1:])), spread
    assert spread[0] < spread[-1] / 2


@pytest.mark.parametrize("side", [32, 224])
def test_every_corruption_at_every_severity_keeps_shape_and_dtype(side):
    image = _images(1, side, seed=side)
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            out = corrupt_images(image, corruption, severity, seed=0)
            assert out.shape == image.shape and out.dtype == np.uint8, (corruption, severity)
            assert not np.array_equal(out, image), (corruption, severity)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_small_and_grayscale_images(corruption):
    """8x8 and 28x28 images (below the library's 32 px) and one-channel images work."""
    for images in (_images(2, 8), _images(2, 28, channels=1), _images(1, 8, channels=1)):
        out = corrupt_images(images, corruption, 5, seed=1)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert not np.array_equal(out, images)


def _library_corruption(image, corruption: str, severity: int, seed: int, index: int):
    """imagecorruptions' own output for image `index` of a call with `seed`: numpy's and
    python's global RNGs (and the `seed` argument of glass_blur / impulse_noise) seeded
    with the 32-bit SeedSequence state of (seed, crc32(name), severity, index)."""
    import zlib

    from imagecorruptions import corrupt

    entropy = [seed, zlib.crc32(corruption.encode()), severity, index]
    seed_i = int(np.random.SeedSequence(entropy).generate_state(1)[0])
    np.random.seed(seed_i)
    random.seed(seed_i)
    kwargs = {"seed": seed_i} if corruption in ("glass_blur", "impulse_noise") else {}
    return corrupt(image, severity=severity, corruption_name=corruption, **kwargs)


@pytest.mark.parametrize(
    "corruption", ["gaussian_noise", "impulse_noise", "glass_blur", "zoom_blur", "contrast"]
)
def test_outputs_equal_imagecorruptions_own_under_the_same_seed(corruption):
    images = _images(3, 32, seed=11)
    out = corrupt_images(images, corruption, 3, seed=4)
    for i, image in enumerate(images):
        assert np.array_equal(out[i], _library_corruption(image, corruption, 3, 4, i)), i


@pytest.mark.parametrize("corruption", ["gaussian_noise", "zoom_blur"])
def test_a_small_grey_image_is_the_centre_of_its_symmetric_padding_corrupted(corruption):
    """A 16x20 one-channel image: repeated to RGB, padded symmetrically to 32x32 (8 + 8
    rows, 6 + 6 columns), corrupted by the library, cropped back from the centre, first
    channel."""
    image = _images(1, 20, channels=1, seed=12)[:, :16]
    out = corrupt_images(image, corruption, 4, seed=2)
    rgb = np.repeat(image[0], 3, axis=-1)
    padded = np.pad(rgb, ((8, 8), (6, 6), (0, 0)), mode="symmetric")
    expected = _library_corruption(padded, corruption, 4, 2, 0)[8:24, 6:26, :1]
    assert np.array_equal(out[0], expected)


def test_non_square_small_image():
    image = np.ascontiguousarray(_images(1, 40)[:, :, :20])  # 40 high, 20 wide: pad width
    out = corrupt_images(image, "zoom_blur", 2, seed=0)
    assert out.shape == (1, 40, 20, 3)


# ---------------------------------------------------------------- cache


def test_cache_writes_once_and_reloads(tmp_path, monkeypatch):
    images, labels = _images(3, 32), np.array([0, 1, 2])
    made, made_labels = corrupted_set(tmp_path, images, labels, "toy-test", "snow", 2, seed=0)
    path = tmp_path / "toy-test" / "snow" / "2.npy"
    assert path.is_file() and path == cache_path(tmp_path, "toy-test", "snow", 2)
    assert [p.name for p in path.parent.iterdir()] == ["2.npy"]  # no temporary file left
    np.testing.assert_array_equal(made_labels, labels)

    import qgen_ray.data.corruptions as module

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a cached set")

    monkeypatch.setattr(module, "corrupt_images", fail)
    loaded, loaded_labels = corrupted_set(tmp_path, images, labels, "toy-test", "snow", 2)
    assert loaded.tobytes() == made.tobytes() and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded_labels, labels)
    # another seed is another set, in its own file
    with pytest.raises(AssertionError, match="regenerated"):
        corrupted_set(tmp_path, images, labels, "toy-test", "snow", 2, seed=1)


def test_cache_shape_mismatch_is_a_user_error(tmp_path):
    corrupted_set(tmp_path, _images(3, 32), np.zeros(3), "toy", "fog", 1)
    with pytest.raises(UserError, match="delete it or use another dataset key"):
        corrupted_set(tmp_path, _images(4, 32), np.zeros(4), "toy", "fog", 1)


# ---------------------------------------------------------------- CIFAR-10-C reader


def _write_cifar_c(root: Path, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-C folder: `fog.npy` with 5 x n images (pixel 0 = severity) and `labels.npy`."""
    images = _images(5 * n, 32)
    images[:, 0, 0, 0] = np.repeat(np.arange(1, 6), n)
    labels = np.tile(np.arange(n, dtype=np.uint8), 5)  # published labels are uint8
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "fog.npy", images)
    np.save(root / "labels.npy", labels)
    return images, labels


def test_read_cifar_c_slices_by_severity(tmp_path):
    images, labels = _write_cifar_c(tmp_path, n=4)
    for severity in SEVERITIES:
        got, got_labels = read_cifar_c(tmp_path, "fog", severity)
        assert got.shape == (4, 32, 32, 3) and got.dtype == np.uint8
        assert got_labels.dtype == np.int64
        assert (got[:, 0, 0, 0] == severity).all()
        np.testing.assert_array_equal(got, images[(severity - 1) * 4 : severity * 4])
        np.testing.assert_array_equal(got_labels, [0, 1, 2, 3])


def test_read_cifar_c_missing_files(tmp_path):
    with pytest.raises(UserError, match=r"missing .*snow\.npy.*download CIFAR-10-C.*on the fly"):
        read_cifar_c(tmp_path, "snow", 1)
    _write_cifar_c(tmp_path)
    (tmp_path / "labels.npy").unlink()
    with pytest.raises(UserError, match=r"missing .*labels\.npy"):
        read_cifar_c(tmp_path, "fog", 1)


def test_read_cifar_c_wrong_shapes(tmp_path):
    _write_cifar_c(tmp_path)
    np.save(tmp_path / "labels.npy", np.zeros(7, np.uint8))
    with pytest.raises(UserError, match="5 severities x n images"):
        read_cifar_c(tmp_path, "fog", 1)
    np.save(tmp_path / "fog.npy", np.zeros((20, 32, 32), np.uint8))
    with pytest.raises(UserError, match=r"not uint8 \[N,H,W,3\]"):
        read_cifar_c(tmp_path, "fog", 1)
    np.save(tmp_path / "fog.npy", np.zeros((18, 32, 32, 3), np.uint8))
    np.save(tmp_path / "labels.npy", np.zeros(18, np.uint8))
    with pytest.raises(UserError, match="5 severities x n images"):
        read_cifar_c(tmp_path, "fog", 1)
    with pytest.raises(UserError, match="unknown corruption"):
        read_cifar_c(tmp_path, "rain", 1)


# ---------------------------------------------------------------- ImageNet-C reader


def _write_imagenet_c(root: Path, corruption: str, severity: int, wnids: list[str]) -> None:
    """Two JPEGs per class; each image's colour encodes its class (red = 60 * position)."""
    for position, wnid in enumerate(wnids):
        folder = root / corruption / str(severity) / wnid
        folder.mkdir(parents=True)
        for i in range(2):
            color = (60 * position, 100, 20 * i)
            Image.new("RGB", (40, 30), color).save(folder / f"ILSVRC2012_val_{i}.JPEG")


def test_read_imagenet_c_with_clean_mapping(tmp_path):
    wnids = ["n01440764", "n01443537"]
    _write_imagenet_c(tmp_path, "frost", 3, wnids)
    clean = {"n00000001": 0, "n01440764": 1, "n01443537": 2}  # the clean set has more classes
    data = read_imagenet_c(tmp_path, "frost", 3, class_to_idx=clean)
    assert len(data) == 4
    assert data.classes == ["n00000001", "n01440764", "n01443537"]
    labels = sorted(data[i][1] for i in range(len(data)))
    assert labels == [1, 1, 2, 2]
    for i in range(len(data)):
        image, label = data[i]
        assert isinstance(image, Image.Image) and image.size == (40, 30)
        red = np.asarray(image)[..., 0].mean()
        assert abs(red - 60 * wnids.index(data.classes[label])) < 8


def test_read_imagenet_c_default_mapping_and_transform(tmp_path):
    _write_imagenet_c(tmp_path, "fog", 1, ["n02", "n01"])
    data = read_imagenet_c(tmp_path, "fog", 1, transform=lambda im: np.asarray(im).shape)
    assert data.class_to_idx == {"n01": 0, "n02": 1}
    assert data[0] == ((30, 40, 3), 0)


def test_read_imagenet_c_errors(tmp_path):
    _write_imagenet_c(tmp_path, "fog", 1, ["n01", "n02"])
    with pytest.raises(UserError, match=r"missing folder .*fog.2.*download ImageNet-C"):
        read_imagenet_c(tmp_path, "fog", 2)
    with pytest.raises(UserError, match=r"missing folder .*snow"):
        read_imagenet_c(tmp_path, "snow", 1)
    with pytest.raises(UserError, match="n02 that the clean set lacks"):
        read_imagenet_c(tmp_path, "fog", 1, class_to_idx={"n01": 0})
    (tmp_path / "fog" / "3").mkdir()
    with pytest.raises(UserError, match=r"no images under .*fog.3"):
        read_imagenet_c(tmp_path, "fog", 3)
    with pytest.raises(UserError, match="outside 1..5"):
        read_imagenet_c(tmp_path, "fog", 0)


def test_cache_holds_several_sets_in_one_folder_and_a_failed_write_leaves_nothing(
    tmp_path, monkeypatch
):
    images, labels = _images(2, 32), np.array([0, 1])
    corrupted_set(tmp_path, images, labels, "toy", "fog", 1)
    corrupted_set(tmp_path, images, labels, "toy", "fog", 2)  # same folder, second file
    folder = tmp_path / "toy" / "fog"
    assert sorted(p.name for p in folder.iterdir()) == ["1.npy", "2.npy"]

    import qgen_ray.data.corruptions as module

    def interrupted(src, dst):
        raise KeyboardInterrupt  # e.g. Ctrl-C between the write and the rename

    monkeypatch.setattr(module.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        corrupted_set(tmp_path, images, labels, "toy", "fog", 3)
    assert sorted(p.name for p in folder.iterdir()) == ["1.npy", "2.npy"]  # no temp, no 3


def test_grayscale_corruption_is_the_first_channel_of_the_rgb_one():
    """A one-channel image is corrupted as its RGB replica; the first channel is kept."""
    grey = _images(2, 32, channels=1, seed=5)
    out = corrupt_images(grey, "gaussian_noise", 2, seed=3)
    rgb = corrupt_images(np.repeat(grey, 3, axis=-1), "gaussian_noise", 2, seed=3)
    assert np.array_equal(out, rgb[..., :1])


def test_image_and_label_counts_must_agree(tmp_path):
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        corrupted_set(tmp_path, _images(3, 32), np.zeros(2), "toy", "fog", 1)
