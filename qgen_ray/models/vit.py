"""Vision transformers from timm: DeiT-Tiny and Swin-Tiny (QGen ImageNet study, VVTQ).

`deit_tiny` is timm's `deit_tiny_patch16_224`, `swin_tiny` its
`swin_tiny_patch4_window7_224`, built with `pretrained=False` (timm then never touches the
network) at `img_size=image_size`, `in_chans=in_channels`, `num_classes=num_classes`.
`pretrained=True` fetches timm's ImageNet weights from the Hugging Face hub (or its cache;
`HF_HUB_OFFLINE=1` allows only the cache); timm resizes position embeddings and drops a
head of another size. A `weights=<file>` goes through the same timm path: a state dict of
the architecture at any image size and class count (e.g. timm's published 224-pixel,
1000-class weights saved locally) is loaded with its position embeddings resampled to
`image_size`; its head is kept when it has `num_classes` classes and dropped otherwise,
and every other key must match (`weights.check_loaded_keys`: timm itself loads a model
with another head loosely).

Small inputs: DeiT needs `image_size` divisible by `patch_size` (default 16, so 32x32
gives 2x2 tokens + the class token). Swin merges 2x2 patches three times, so
`image_size` must be divisible by `patch_size * 8` (default 4 -> 32; we refuse the zero
padding timm would otherwise add at odd merges); stages whose map
is smaller than `window_size` use the whole map as one window (timm's rule), so
`image_size=32` works with the default window 7.
"""

from __future__ import annotations

import timm
from torch import nn

from qgen_ray.errors import UserError
from qgen_ray.models.registry import register_model
from qgen_ray.models.weights import WEIGHTS_FIX, head_classes

SWIN_MERGES = 3  # patch-merging stages of Swin-T (each halves the token grid)


def timm_model(
    arch: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    pretrained: bool,
    state_dict: dict | None = None,
    **options: int,
) -> nn.Module:
    """timm's `arch` at `image_size`, from `state_dict` (a local file's, loaded by timm:
    position embeddings resampled, the head kept when it has num_classes, else dropped) or
    the hub's weights (`pretrained`); UserError when published weights are not reachable."""
    overlay = {}
    if state_dict:
        # timm keeps the head only when num_classes equals its config's count: the file's
        head = timm.models.get_pretrained_cfg(arch).classifier
        classes = head_classes(state_dict, head)
        overlay = {"state_dict": state_dict, **({"num_classes": classes} if classes else {})}
    try:
        model = timm.create_model(
            arch,
            pretrained=pretrained or bool(state_dict),
            num_classes=num_classes,
            in_chans=in_channels,
            img_size=image_size,
            **({"pretrained_cfg_overlay": overlay} if overlay else {}),
            **options,
        )
    except OSError as err:
        raise UserError(
            f"cannot fetch timm weights for {arch} ({err.__class__.__name__}); connect to the "
            f"Hugging Face hub, fill its cache, or {WEIGHTS_FIX}"
        ) from None
    model.pretrained_cfg.pop("state_dict", None)  # the file's tensors are not kept twice
    return model


def _check_divisible(name: str, image_size: int, divisor: int, why: str) -> None:
    if image_size % divisor:
        raise UserError(
            f"{name} needs image_size divisible by {divisor} ({why}), got {image_size}; "
            "change image_size or patch_size"
        )


@register_model("deit_tiny", head="head", origin="timm's deit_tiny_patch16_224", pretrained=True,
                library=("timm", "deit_tiny_patch16_224"))  # fmt: skip
def deit_tiny(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    patch_size: int = 16,
    pretrained: bool = False,
    state_dict: dict | None = None,
) -> nn.Module:
    """DeiT-Tiny (Touvron et al. 2021); `patch_size`: side of a token's patch in pixels."""
    _check_divisible("deit_tiny", image_size, patch_size, "patch_size")
    return timm_model(
        "deit_tiny_patch16_224",
        num_classes,
        in_channels,
        image_size,
        pretrained,
        state_dict,
        patch_size=patch_size,
    )


@register_model(
    "swin_tiny",
    head="head.fc",
    origin="timm's swin_tiny_patch4_window7_224",
    pretrained=True,
    library=("timm", "swin_tiny_patch4_window7_224"),
)
def swin_tiny(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    patch_size: int = 4,
    window_size: int = 7,
    pretrained: bool = False,
    state_dict: dict | None = None,
) -> nn.Module:
    """Swin-Tiny (Liu et al. 2021); `patch_size`: side of a patch in pixels; `window_size`:
    side of an attention window in tokens."""
    divisor = patch_size * 2**SWIN_MERGES
    _check_divisible("swin_tiny", image_size, divisor, f"patch_size x 2^{SWIN_MERGES}")
    return timm_model(
        "swin_tiny_patch4_window7_224",
        num_classes,
        in_channels,
        image_size,
        pretrained,
        state_dict,
        patch_size=patch_size,
        window_size=window_size,
    )
