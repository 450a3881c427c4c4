"""The paper's 15 corruptions x 5 severities (docs/method.md §6), made on the fly and cached.

Corrupted test sets are made with `imagecorruptions-imaug` (Hendrycks & Dietterich's
ImageNet-C code, packaged to run at any image size >= 32 px) when no published set
(CIFAR-10-C, CIFAR-100-C, ImageNet-C; see `corruption_readers`) is given.

Determinism. The library draws from numpy's global RNG (most corruptions), from a numba
RNG seeded by its `seed` argument (glass_blur) and from a fresh generator unless given a
`seed` (impulse_noise). `corrupt_images` therefore derives one 32-bit seed per image from
(seed, corruption, severity, image index), seeds numpy's global RNG and python's `random`
with it, and passes it as `seed` to the two corruptions that take one: the same call gives
byte-identical output in any process. The caller's numpy and python RNG states are saved
before and restored after, so corrupting a set does not shift a training run's random
stream. Because the RNG is global, do not corrupt from several threads of one process at
once (processes, such as Ray tasks, are fine).

Small images. The library refuses images under 32 px a side. Such images (MNIST 28x28,
digits 8x8) are padded symmetrically (mirror, centred) up to 32 px, corrupted, and the
centre cropped back. Padding rather than resizing keeps the per-pixel strength of noise,
blur radii and block sizes exactly as at 32 px; resizing would average noise away.

Grayscale. Images with one channel are replicated to three, corrupted, and channel 0 is
kept: noise keeps its full per-pixel strength (a luminance mix would shrink its standard
deviation by a third); the other corruptions leave the three channels (nearly) equal.

Severity parameters are the library's (ImageNet-C's) at every image size; CIFAR-10-C used
its own milder constants, so generated CIFAR sets are harder than the published ones.
"""

from __future__ import annotations

import os
import random
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from qgen_ray.errors import DamagedFile, UserError, say_set_aside

# The 15 corruptions of docs/method.md §6, in the paper's (and ImageNet-C's) order.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
# Severity levels, 1 (mildest) to 5 (strongest), as in ImageNet-C.
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# imagecorruptions refuses images whose height or width is below this many pixels.
MIN_SIDE = 32
# Corruptions whose randomness comes from a `seed` argument, not numpy's global RNG.
_TAKE_SEED_ARGUMENT = frozenset({"glass_blur", "impulse_noise"})


def validate(corruptions: str | Iterable[str], severities: int | Iterable[int]) -> None:
    """Raise `UserError` for a corruption name not in CORRUPTIONS or a severity not in 1..5."""
    names = [corruptions] if isinstance(corruptions, str) else list(corruptions)
    levels = [severities] if isinstance(severities, int) else list(severities)
    for name in names:
        if name not in CORRUPTIONS:
            raise UserError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise UserError(f"severity {level!r} is not an integer; pass severities from 1 to 5")
        if level not in SEVERITIES:
            raise UserError(f"severity {level} is outside 1..5; pass severities from 1 to 5")


def image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """The 32-bit seed of image `index`: a stable function of all four (no `hash()` salt)."""
    entropy = [seed, zlib.crc32(corruption.encode()), severity, index]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@contextmanager
def _global_rngs_restored() -> Iterator[None]:
    """Save numpy's global RNG and python's `random` state; restore them on exit."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _pad_width(height: int, width: int) -> tuple[tuple[int, int], ...]:
    """Padding (before, after) per axis that brings each side up to MIN_SIDE, centred."""

    def split(side: int) -> tuple[int, int]:
        missing = max(MIN_SIDE - side, 0)
        return missing // 2, missing - missing // 2

    return split(height), split(width), (0, 0)


def _corrupt_one(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt one uint8 [H,W,3] image with every RNG seeded from `seed`."""
    from imagecorruptions import corrupt  # imports numba, cv2, skimage: slow, so lazily

    np.random.seed(seed)
    random.seed(seed)
    kwargs = {"seed": seed} if corruption in _TAKE_SEED_ARGUMENT else {}
    return corrupt(image, severity=severity, corruption_name=corruption, **kwargs)


def corrupt_images(images: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt uint8 images [N,H,W,C] (C = 1 or 3); same call, byte-identical output.

    Returns a new uint8 array of the input's shape. See the module docstring for how
    seeding, small images and grayscale are handled.
    """
    validate(corruption, severity)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images [N,H,W,C] with C in (1, 3), got {images.dtype} {images.shape}"
        )
    _, height, width, channels = images.shape
    pad = _pad_width(height, width)
    (top, _), (left, _), _ = pad
    out = np.empty_like(images)
    with _global_rngs_restored():
        for index, image in enumerate(images):
            rgb = np.repeat(image, 3, axis=-1) if channels == 1 else image
            padded = np.pad(rgb, pad, mode="symmetric")
            seed_i = image_seed(seed, corruption, severity, index)
            corrupted = _corrupt_one(padded, corruption, severity, seed_i)
            crop = corrupted[top : top + height, left : left + width]
            out[index] = crop[..., :1] if channels == 1 else crop
    return out


def cache_path(
    cache_dir: str | Path, dataset_key: str, corruption: str, severity: int, seed: int = 0
) -> Path:
    """Where `corrupted_set` keeps a set: `<cache_dir>/<dataset_key>/<corruption>/<severity>.npy`.

    A non-default seed gets its own file, `<severity>-seed<seed>.npy`, so sets made with
    different seeds never overwrite or stand in for each other.
    """
    stem = str(severity) if seed == 0 else f"{severity}-seed{seed}"
    return Path(cache_dir) / dataset_key / corruption / f"{stem}.npy"


def _readable_cache(path: Path) -> np.ndarray | None:
    """A cached corrupted set, or None when there is none or it is damaged (then kept as
    `<name>.damaged` and generated again)."""
    if not path.exists():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        kept = path.with_name(f"{path.name}.damaged")
        os.replace(path, kept)
        say_set_aside(str(path), DamagedFile(path.name, err), kept.name, "generated again")
        return None


def _save_atomically(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` via a temporary file and `os.replace`: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def corrupted_set(
    cache_dir: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    dataset_key: str,
    corruption: str,
    severity: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The corrupted `images` and their `labels`, made once and then loaded from the cache.

    `dataset_key` must name the exact images (e.g. "cifar10-test"): a cached file is
    trusted if its shape matches, so two different sets must not share a key.
    """
    validate(corruption, severity)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    path = cache_path(cache_dir, dataset_key, corruption, severity, seed)
    cached = _readable_cache(path)
    if cached is not None:
        if cached.shape != images.shape or cached.dtype != np.uint8:
            raise UserError(
                f"cached corrupted set {path} holds {cached.dtype} {cached.shape}, not the "
                f"dataset's uint8 {images.shape}; delete it or use another dataset key"
            )
        return cached, np.asarray(labels)
    corrupted = corrupt_images(images, corruption, severity, seed)
    _save_atomically(path, corrupted)
    return corrupted, np.asarray(labels)
