"""scikit-learn's bundled digits (1,797 real 8x8 handwritten digits): the offline default.

Shaped for the same models as CIFAR: grey 8x8 images scaled to 0..255 and upsampled
(bilinear) to 16x16, one channel, so NiN's stride-2 blocks have room for depth 3. The
split is stratified and fixed (`SPLIT_SEED`, `TEST_FRACTION`), so every machine gets the
same train/test sets. No augmentation: flips and crops change what a digit means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qgen_ray.data.base import ImageData

IMAGE_SIZE = 16  # pixels per side after upsampling the 8x8 originals
TEST_FRACTION = 0.25  # 1,347 train / 450 test images
SPLIT_SEED = 0  # stratified split seed: fixed, part of the dataset's definition


def load_digits_data(root: str | None = None, download: bool = False) -> ImageData:
    """Load the digits; `root` and `download` are accepted for a uniform signature."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        range(len(labels)),
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=bunch.target,
    )
    train_idx, test_idx = torch.tensor(sorted(train_idx)), torch.tensor(sorted(test_idx))
    train_x = images[train_idx]
    scaled = train_x.float() / 255.0
    return ImageData(
        name="digits",
        train_x=train_x,
        train_y=labels[train_idx],
        test_x=images[test_idx],
        test_y=labels[test_idx],
        mean=(float(scaled.mean()),),
        std=(float(scaled.std()),),
        num_classes=10,
    )
