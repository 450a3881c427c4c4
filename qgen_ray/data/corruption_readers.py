"""Readers for the published corrupted test sets (Hendrycks & Dietterich, ICLR 2019).

    CIFAR-10-C / CIFAR-100-C   <root>/<corruption>.npy   uint8 [5n,H,W,3], severity 1..5
                               <root>/labels.npy         [5n], the same n labels 5 times
    ImageNet-C                 <root>/<corruption>/<severity>/<wnid>/*.JPEG

`root` is the user's `--corrupt-root`. A missing or malformed file is a `UserError` naming
the path and the fix: download the set, or (CIFAR) omit `--corrupt-root` to generate the
corruptions on the fly (`corruptions.corrupted_set`); ImageNet-C must be downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets import ImageFolder

from qgen_ray.data.corruptions import SEVERITIES, validate
from qgen_ray.errors import UserError

_CIFAR_C_FIX = (
    "download CIFAR-10-C / CIFAR-100-C from Hendrycks & Dietterich (zenodo.org/records/2535967,"
    " /3555552) and pass --corrupt-root DIR, or omit --corrupt-root to generate corruptions"
    " on the fly"
)
IMAGENET_C_URL = "zenodo.org/records/2235448"  # ImageNet-C (Hendrycks & Dietterich)
# ImageNet-C is never generated on the fly (50,000 images x 75 sets): the fix is the download.
_IMAGENET_C_FIX = (
    f"download ImageNet-C from Hendrycks & Dietterich ({IMAGENET_C_URL}) and pass"
    " --corrupt-root DIR holding <corruption>/<severity>/<wnid>/*.JPEG"
)


def _load_npy(path: Path) -> np.ndarray:
    """Memory-map a `.npy` file (a CIFAR-C file is 150 MB; one severity is a fifth)."""
    if not path.is_file():
        raise UserError(f"missing {path}; {_CIFAR_C_FIX}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise UserError(f"{path} is not a readable .npy file ({err}); {_CIFAR_C_FIX}") from None


def read_cifar_c(root: str | Path, corruption: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
    """One severity of a CIFAR-10-C / CIFAR-100-C corruption: (uint8 [n,H,W,3], int64 [n]).

    Severity s is rows (s-1)*n .. s*n of `<corruption>.npy` and `labels.npy`, n = rows / 5.
    """
    validate(corruption, severity)
    root = Path(root)
    images_path, labels_path = root / f"{corruption}.npy", root / "labels.npy"
    images, labels = _load_npy(images_path), _load_npy(labels_path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(
            f"{images_path} holds {images.dtype} {images.shape}, not uint8 [N,H,W,3]; "
            f"{_CIFAR_C_FIX}"
        )
    if len(images) % len(SEVERITIES) or labels.shape != (len(images),):
        raise UserError(
            f"{images_path} has {len(images)} images and {labels_path} shape {labels.shape}; "
            f"expected 5 severities x n images and n labels per severity; {_CIFAR_C_FIX}"
        )
    n = len(images) // len(SEVERITIES)
    rows = slice((severity - 1) * n, severity * n)
    return np.array(images[rows]), np.array(labels[rows], dtype=np.int64)


class ImageNetCFolder(ImageFolder):
    """One ImageNet-C corruption and severity, labelled by the clean set's `class_to_idx`.

    Without `class_to_idx` the labels are the sorted wnid folders' positions, as in
    torchvision's ImageFolder; with it, each wnid gets the clean set's index (so a
    corruption folder missing some classes still lines up with the model's outputs), and
    `classes` is the clean set's wnids in index order.
    """

    def __init__(
        self,
        root: str | Path,
        class_to_idx: dict[str, int] | None = None,
        transform: Callable[[Any], Any] | None = None,
    ):
        self._clean_class_to_idx = class_to_idx
        super().__init__(root, transform=transform)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        wnids, own = super().find_classes(directory)
        if self._clean_class_to_idx is None:
            return wnids, own
        unknown = sorted(set(wnids) - set(self._clean_class_to_idx))
        if unknown:
            raise UserError(
                f"{directory} has class folders {', '.join(unknown[:5])} that the clean set "
                "lacks; point --corrupt-root at the ImageNet-C of the same classes"
            )
        clean = self._clean_class_to_idx
        return sorted(clean, key=clean.__getitem__), {wnid: clean[wnid] for wnid in wnids}


def read_imagenet_c(
    root: str | Path,
    corruption: str,
    severity: int,
    class_to_idx: dict[str, int] | None = None,
    transform: Callable[[Any], Any] | None = None,
) -> ImageNetCFolder:
    """A Dataset of `<root>/<corruption>/<severity>/<wnid>/*.JPEG` yielding (image, label).

    Images are PIL RGB images, or whatever `transform` makes of them. Pass the clean
    validation set's `class_to_idx` so labels match the model's classes.
    """
    validate(corruption, severity)
    folder = Path(root) / corruption / str(severity)
    if not folder.is_dir():
        raise UserError(f"missing folder {folder}; {_IMAGENET_C_FIX}")
    try:
        return ImageNetCFolder(folder, class_to_idx=class_to_idx, transform=transform)
    except FileNotFoundError as err:
        raise UserError(f"no images under {folder} ({err}); {_IMAGENET_C_FIX}") from None
