"""An ImageFolder split as the measures and landscapes read it: a lazy image tensor.

The measures (`qgen_ray.measures`) read the training set `x` only through `x.shape`,
`x.device`, `x.to(device)` and `x[index]` with an index tensor or a slice. For the
in-memory datasets `x` is the whole normalized training set; ImageNet's 1.28 M images
do not fit, so `FolderImages` is what `x` is for an ImageFolder: `x[index]` decodes
exactly those images through the model's evaluation transform (no augmentation, the
images as the model is evaluated on them) and returns them normalized on `x.device`.
So the fast search decodes only what it reads (a margin pool of at most 4,096 images,
at most 256 per probe and its ascent mini-batches), the faithful search streams the
whole training set once per bisection step, and the measure code runs unchanged.

Images are decoded by a pool of threads (Pillow releases the GIL while decoding and
resizing). The most recently read images are kept (`cache_images`, least recently used
out first): the fast search's probes re-read the same prefix of its image order at every
radius, so each of those is decoded once; a full pass (faithful) streams through.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import Dataset

CACHE_IMAGES = 1024  # decoded images kept (float32: 0.6 MB each at 224 px)


class FolderImages:
    """`x` of the measures for an image Dataset whose items are (image tensor, label, ...):
    `shape` [N, C, H, W], `device`, `to(device)`, `x[index]` -> float [n, C, H, W] for an
    index tensor, boolean mask, list or slice, [C, H, W] for one integer."""

    def __init__(
        self,
        dataset: Dataset,
        device: torch.device | str = "cpu",
        *,
        threads: int = 1,
        cache_images: int = CACHE_IMAGES,
        _shared: dict | None = None,
    ):
        self.dataset = dataset
        self.device = torch.device(device)
        self.threads = max(1, int(threads))
        self.cache_images = cache_images
        # state shared by the views `to()` returns: one cache and one read count
        self._shared = _shared if _shared is not None else {"cache": OrderedDict(), "decoded": 0}
        first = self._decode(0) if _shared is None else self._shared["first"]
        self._shared["first"] = first
        self.shape = torch.Size([len(dataset), *first.shape])

    @property
    def decoded(self) -> int:
        """Images decoded from disk so far (cache hits not counted)."""
        return self._shared["decoded"]

    def to(self, device: torch.device | str) -> FolderImages:
        """The same images, returned on `device` (shares the cache)."""
        return FolderImages(self.dataset, device, threads=self.threads,
                            cache_images=self.cache_images, _shared=self._shared)  # fmt: skip

    def __len__(self) -> int:
        return self.shape[0]

    def _decode(self, i: int) -> torch.Tensor:
        return self.dataset[i][0]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0):
            return self[[int(index)]][0]
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            index = index.nonzero().flatten()
        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        elif isinstance(index, torch.Tensor):
            index = index.flatten().tolist()
        else:
            index = list(index)
        cache: OrderedDict = self._shared["cache"]
        missing = list(dict.fromkeys(i for i in index if i not in cache))
        if missing:
            if self.threads > 1 and len(missing) > 1:
                with ThreadPoolExecutor(self.threads) as pool:
                    images = list(pool.map(self._decode, missing))
            else:
                images = [self._decode(i) for i in missing]
            self._shared["decoded"] += len(missing)
            fresh = dict(zip(missing, images, strict=True))
        else:
            fresh = {}
        out = []
        for i in index:
            image = fresh.get(i)
            if image is None:
                image = cache[i]
                cache.move_to_end(i)
            out.append(image)
        for i, image in fresh.items():  # keep the newest reads, the oldest leave first
            cache[i] = image
            if len(cache) > self.cache_images:
                cache.popitem(last=False)
        if not out:
            return torch.empty(0, *self.shape[1:], device=self.device)
        return torch.stack(out).to(self.device, non_blocking=True)


def folder_labels(dataset) -> torch.Tensor:
    """int64 labels of an ImageFolder (read from its file list, no image decoded)."""
    return torch.as_tensor(dataset.targets, dtype=torch.int64)


__all__ = ["CACHE_IMAGES", "FolderImages", "folder_labels"]
