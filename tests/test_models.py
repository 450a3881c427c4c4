"""The model zoo: every registered model builds, runs forward and backward, and loads
weights files; errors a user can cause are one line listing the fix."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
from torch import nn

from qgen_ray.errors import UserError
from qgen_ray.models import (
    MODELS,
    count_params,
    create_model,
    load_fitting,
    model_options,
    read_weights_file,
)

NUM_CLASSES = 10
BATCH = 2
IMAGE_SIZE = 32  # the smallest CIFAR size; also works for both ViTs (see models/vit.py)


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_trains_one_step_on_cpu(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, image_size=IMAGE_SIZE)
    x = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    out = model(x)
    assert out.shape == (BATCH, NUM_CLASSES)
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_takes_one_input_channel(name: str) -> None:
    model = create_model(name, NUM_CLASSES, in_channels=1, image_size=IMAGE_SIZE).eval()
    with torch.no_grad():
        out = model(torch.randn(BATCH, 1, IMAGE_SIZE, IMAGE_SIZE))
    assert out.shape == (BATCH, NUM_CLASSES)
    assert convs(model)[0].in_channels == 1


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UserError, match="unknown model 'resnet17'") as err:
        create_model("resnet17", NUM_CLASSES)
    for name in ("nin", "resnet18", "swin_tiny"):
        assert name in str(err.value)


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(UserError, match="no option widht; valid options: base_width, depth, width"):
        create_model("nin", NUM_CLASSES, widht=2)
    with pytest.raises(UserError, match="valid options: none"):
        create_model("vgg16_cifar", NUM_CLASSES, depth=2)
    assert model_options("swin_tiny") == {"patch_size": 4, "window_size": 7}


@pytest.mark.parametrize(("depth", "width"), [(1, 1), (2, 3), (4, 2)])
def test_nin_layers_and_channels(depth: int, width: int) -> None:
    model = create_model("nin", NUM_CLASSES, depth=depth, width=width)
    layers = convs(model)
    assert len(layers) == 3 * depth + 1  # three per block, one in the head
    assert all(conv.bias is not None for conv in layers)
    assert {conv.out_channels for conv in layers[:-1]} == {25 * width}
    assert [conv.stride for conv in layers[:-1]] == [(2, 2), (1, 1), (1, 1)] * depth
    assert layers[-1].out_channels == NUM_CLASSES
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(layers)
    c, k = 25 * width, NUM_CLASSES
    conv1x1_pair = 2 * (c * c + 3 * c)  # weight + bias + BN scale and shift
    block = [9 * i * c + 3 * c + conv1x1_pair for i in [3] + [c] * (depth - 1)]
    assert count_params(model) == sum(block) + c * k + 3 * k


def test_nin_runs_on_16x16_at_depth_4() -> None:
    model = create_model("nin", NUM_CLASSES, depth=4, width=1).eval()
    with torch.no_grad():
        assert model(torch.randn(BATCH, 3, 16, 16)).shape == (BATCH, NUM_CLASSES)


# (model, classes, image size, options) -> parameters, as published by the model's source
PUBLISHED_PARAMS = {
    ("resnet18", 1000, 224, ()): 11_689_512,  # torchvision's model table
    ("resnet50", 1000, 224, ()): 25_557_032,  # torchvision's model table
    ("mobilenet_v2", 1000, 224, ()): 3_504_872,  # torchvision's model table
    ("mobilenet_v1", 1000, 224, ()): 4_231_976,  # Howard et al. 2017, Table 8: 4.2 M
    ("deit_tiny", 1000, 224, ()): 5_717_416,  # timm deit_tiny_patch16_224 (DeiT: 5 M)
    ("swin_tiny", 1000, 224, ()): 28_288_354,  # timm swin_tiny_patch4_window7_224 (28 M)
    ("vgg16_cifar", 10, 32, ()): 14_728_266,  # the common CIFAR VGG-16 with BN (14.7 M)
    ("vgg19_cifar", 10, 32, ()): 20_040_522,  # the common CIFAR VGG-19 with BN (20.0 M)
    ("resnet18_cifar", 10, 32, (("base_width", 64),)): 11_173_962,  # He et al.'s CIFAR
    ("resnet50_cifar", 10, 32, (("base_width", 64),)): 23_520_842,  # ResNets at width 64
    # no published count: the layer tables in the modules' docstrings, summed by hand
    # AlexNet: convs 3x3 64-192-384-256-256 (+ biases), FC 1024-4096-4096-10
    ("alexnet_cifar", 10, 32, ()): (64 * 27 + 64)
    + (192 * 576 + 192)
    + (384 * 1728 + 384)
    + (256 * 3456 + 256)
    + (256 * 2304 + 256)
    + (4096 * 1024 + 4096)
    + (4096 * 4096 + 4096)
    + (10 * 4096 + 10),
    # NiN width 1 (25 channels) depth 2: per block a 3x3 conv and two 1x1 convs, each with
    # bias and BN (2 per channel); head 1x1 conv to 10 classes + BN
    ("nin", 10, 32, ()): (25 * 27 + 25 + 50)
    + (25 * 225 + 25 + 50)
    + 4 * (25 * 25 + 25 + 50)
    + (10 * 25 + 10 + 20),
}


def test_every_model_of_the_zoo_has_a_pinned_parameter_count() -> None:
    assert {key[0] for key in PUBLISHED_PARAMS} == set(MODELS.names())


@pytest.mark.parametrize("key", list(PUBLISHED_PARAMS), ids=lambda key: key[0])
def test_parameter_counts_match_the_published_architectures(key) -> None:
    name, classes, size, options = key
    model = create_model(name, classes, image_size=size, **dict(options))
    assert count_params(model) == PUBLISHED_PARAMS[key]


def test_cifar_resnets_default_to_the_narrow_width() -> None:
    wide = create_model("resnet18_cifar", NUM_CLASSES, base_width=64)
    assert count_params(create_model("resnet18_cifar", NUM_CLASSES)) < count_params(wide) / 10
    bottleneck = create_model("resnet50_cifar", NUM_CLASSES)
    assert bottleneck.fc.in_features == 16 * 8 * 4  # base x 8, expansion 4


def test_weights_file_round_trip(tmp_path) -> None:
    saved = create_model("resnet18", NUM_CLASSES)
    path = tmp_path / "resnet18.pt"
    torch.save(saved.state_dict(), path)
    loaded = create_model("resnet18", NUM_CLASSES, weights=path)
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(saved.eval()(x), loaded.eval()(x))


def test_weights_file_with_another_head_loads_all_but_the_head(tmp_path) -> None:
    imagenet = create_model("resnet18", 1000)
    wrapped = nn.DataParallel(imagenet)  # keys saved as module.*, as from DDP
    path = tmp_path / "imagenet.pt"
    torch.save(wrapped.state_dict(), path)
    loaded = create_model("resnet18", NUM_CLASSES, weights=path)
    assert torch.equal(loaded.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(loaded.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert loaded.fc.weight.shape == (NUM_CLASSES, 512)
    skipped = load_fitting(
        loaded, read_weights_file(path), name="resnet18", head="fc", source="x", origin="y"
    )
    assert skipped == ["fc.weight", "fc.bias"]


def test_weights_file_of_another_architecture_is_a_user_error(tmp_path) -> None:
    path = tmp_path / "mobilenet.pt"
    torch.save(create_model("mobilenet_v2", NUM_CLASSES).state_dict(), path)
    with pytest.raises(UserError, match=f"weights file {path} does not fit resnet18: missing"):
        create_model("resnet18", NUM_CLASSES, weights=path)
    with pytest.raises(UserError, match="pass the file saved from torchvision's resnet18$"):
        create_model("resnet18", NUM_CLASSES, weights=path)


def test_weights_file_with_other_shapes_names_them(tmp_path) -> None:
    path = tmp_path / "nin_wide.pt"
    torch.save(create_model("nin", NUM_CLASSES, width=2).state_dict(), path)
    with pytest.raises(
        UserError, match=r"shapes \(file vs model\) features\.0\.0\.0\.weight \(50, 3, 3, 3\) vs"
    ):
        create_model("nin", NUM_CLASSES, width=1, weights=path)


def test_unreadable_weights_files_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        create_model("nin", NUM_CLASSES, weights=tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable state dict"):
        create_model("nin", NUM_CLASSES, weights=garbage)
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(UserError, match="holds a list, not a state dict"):
        create_model("nin", NUM_CLASSES, weights=listing)


def test_pretrained_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(UserError, match="'nin' has no published weights"):
        create_model("nin", NUM_CLASSES, pretrained=True)
    with pytest.raises(UserError, match="either weights=<file> or pretrained=True"):
        create_model("resnet18", NUM_CLASSES, weights="x.pt", pretrained=True)
    with pytest.raises(UserError, match="take 3 input channels"):
        create_model("resnet18", NUM_CLASSES, in_channels=1, pretrained=True)


def test_torchvision_pretrained_offline_is_a_user_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="is not cached and HF_HUB_OFFLINE=1 forbids downloads"):
        create_model("resnet18", NUM_CLASSES, pretrained=True)


@pytest.mark.skipif(
    not huggingface_hub.constants.HF_HUB_OFFLINE, reason="needs HF_HUB_OFFLINE=1 to fail fast"
)
def test_timm_pretrained_offline_is_a_user_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="cannot fetch timm weights for deit_tiny_patch16_224"):
        create_model("deit_tiny", NUM_CLASSES, pretrained=True)


def test_vit_sizes_that_cannot_tile_are_user_errors() -> None:
    with pytest.raises(UserError, match="swin_tiny needs image_size divisible by 32"):
        create_model("swin_tiny", NUM_CLASSES, image_size=40)
    with pytest.raises(UserError, match="deit_tiny needs image_size divisible by 16"):
        create_model("deit_tiny", NUM_CLASSES, image_size=40)
