"""The ImageNet recipe as the libraries define it (`qgen_ray.imagenet.recipe`): a library
model's transforms are its library's own, checked against the libraries' outputs."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from qgen_ray.imagenet.imagefolder import eval_transform, train_transform
from qgen_ray.imagenet.recipe import model_transform


@pytest.fixture
def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_eval_is_the_weights_own_transform(arch, image):
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    ours = model_transform(arch, 224, train=False)(image)
    assert torch.equal(ours, weights.transforms()(image))
    preset = weights.transforms()
    small = model_transform(arch, 64, train=False)  # the crop at the study's size, the
    assert small.crop_size == [64]  # resize scaled in the weights' own proportion
    assert small.resize_size == [round(64 * preset.resize_size[0] / preset.crop_size[0])]
    assert small(image).shape == (3, 64, 64)


def test_torchvision_training_uses_the_weights_interpolation_and_normalization(image):
    preset = torchvision.models.get_model_weights("resnet50").DEFAULT.transforms()
    train = model_transform("resnet50", 224, train=True)
    crop = train.transforms[0]
    assert isinstance(crop, torchvision.transforms.RandomResizedCrop) and crop.size == (224, 224)
    assert crop.interpolation == preset.interpolation
    norm = train.transforms[-1]
    assert list(norm.mean) == list(preset.mean) and list(norm.std) == list(preset.std)
    torch.manual_seed(0)
    assert train(image).shape == (3, 224, 224)


@pytest.mark.parametrize("name, arch", [("deit_tiny", "deit_tiny_patch16_224"),
                                        ("swin_tiny", "swin_tiny_patch4_window7_224")])  # fmt: skip
def test_timm_transforms_are_timms_own(name, arch, image):
    model = timm.create_model(arch, pretrained=False)
    config = timm.data.resolve_model_data_config(model)
    assert config["interpolation"] == "bicubic"
    for train in (False, True):
        ours = model_transform(name, 224, train=train)
        theirs = timm.data.create_transform(**config, is_training=train)
        assert repr(ours) == repr(theirs)  # the same pipeline, step by step
    torch.manual_seed(0)
    a = model_transform(name, 224, train=False)(image)
    assert torch.equal(a, timm.data.create_transform(**config, is_training=False)(image))


def test_models_trained_from_scratch_keep_the_standard_recipe():
    assert repr(model_transform("nin", 32, train=False)) == repr(eval_transform(32))
    assert repr(model_transform("nin", 32, train=True)) == repr(train_transform(32))


def test_vit_weight_decay_spares_what_timm_spares():
    """The ViT optimizer's no-decay set is timm's own (norms, biases, pos_embed,
    cls_token) plus the quantizers' steps, which timm's rule (1-d and 0-d parameters)
    already spares; a CNN keeps decay on everything but its quantizer steps."""
    from qgen_ray.spec import TrainSpec
    from qgen_ray.train import build_model
    from qgen_ray.train.loop import make_optimizer

    spec = TrainSpec(dataset="imagenet", model="deit_tiny", method="vvtq", bits=4,
                     optimizer="adamw", lr=5e-4, weight_decay=0.05, image_size=32)  # fmt: skip
    model = build_model(spec, 10, 3, 32)
    ours = make_optimizer(spec, model)
    theirs = timm.optim.create_optimizer_v2(model, "adamw", lr=5e-4, weight_decay=0.05,
                                            filter_bias_and_bn=True)  # fmt: skip

    def spared(optimizer) -> set[int]:
        return {
            id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]
        }

    names = {id(p): n for n, p in model.named_parameters()}
    assert spared(ours) == spared(theirs)
    assert {"pos_embed", "cls_token"} <= {names[i] for i in spared(ours)}
    decayed = {names[id(p)] for g in ours.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed and all(n.endswith("weight") and "norm" not in n for n in decayed)

    cnn = TrainSpec(dataset="imagenet", model="resnet18", method="lsq", bits=4,
                    weight_decay=1e-4, image_size=32)  # fmt: skip
    resnet = build_model(cnn, 10, 3, 32)
    spared_cnn = {
        n for n, p in resnet.named_parameters() if id(p) in spared(make_optimizer(cnn, resnet))
    }
    assert spared_cnn and all(".bn" not in n and not n.endswith("bias") for n in spared_cnn)


def test_vit_weights_from_a_local_file_load_through_timm(tmp_path):
    """A 224-pixel, 1000-class timm state dict into a 10-class DeiT at 32 px: the blocks
    load, the position embedding is resampled to 2x2 + 1 tokens, the head is fresh; a
    10-class file keeps its head. A state dict of another architecture, or with keys the
    model does not have, is one line naming the file."""
    from qgen_ray.errors import UserError
    from qgen_ray.models import create_model

    source = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "deit.pt"
    torch.save(source.state_dict(), path)
    model = create_model("deit_tiny", 10, 3, 32, weights=path)
    assert model.pos_embed.shape == (1, 5, 192) and model.head.weight.shape == (10, 192)
    assert torch.equal(model.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    grid = source.pos_embed[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    resampled = torch.nn.functional.interpolate(grid, size=(2, 2), mode="bicubic",
                                                antialias=True)  # fmt: skip
    assert torch.allclose(model.pos_embed[:, 1:], resampled.flatten(2).transpose(1, 2), atol=1e-5)

    other = tmp_path / "small.pt"
    torch.save(timm.create_model("deit_small_patch16_224", pretrained=False).state_dict(), other)
    with pytest.raises(UserError, match=f"weights file {other} does not fit deit_tiny"):
        create_model("deit_tiny", 10, 3, 32, weights=other)

    # a 10-class file (saved through DDP: `module.` keys) keeps its head in a 10-class model
    tuned = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32)
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in tuned.state_dict().items()}, ddp)
    model = create_model("deit_tiny", 10, 3, 32, weights=ddp)
    assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in model.state_dict().items())
    # keys timm would load nothing from (strict off for another head) are one line too
    wrapped = tmp_path / "wrapped.pt"
    torch.save({f"backbone.{k}": v for k, v in source.state_dict().items()}, wrapped)
    with pytest.raises(UserError, match=f"{wrapped} does not fit deit_tiny: missing cls_token"):
        create_model("deit_tiny", 10, 3, 32, weights=wrapped)


def test_distillation_is_kl_to_a_frozen_teacher(tmp_path):
    """VVTQ's online distillation: the extra term is KL(teacher || student) of the
    softmaxes; the teacher is the FP32 model of the starting weights, whole, eval mode and
    frozen (a file whose head is another class count's is one line), it never changes, and
    the student's step moves with it."""
    from dataclasses import replace

    from qgen_ray.errors import UserError
    from qgen_ray.spec import TrainSpec
    from qgen_ray.train import build_model
    from qgen_ray.train.finetune import FinetuneOptions, _teacher, distillation_loss, train_epoch
    from qgen_ray.train.loop import make_optimizer

    s, t = torch.randn(6, 10), torch.randn(6, 10)
    p, q = t.softmax(1), s.softmax(1)
    assert torch.allclose(distillation_loss(s, t), (p * (p.log() - q.log())).sum(1).mean())
    assert distillation_loss(t, t) == 0

    spec = TrainSpec(dataset="imagenet", model="deit_tiny", method="vvtq", bits=4,
                     optimizer="adamw", lr=1e-3, weight_decay=0.05, image_size=32,
                     epochs=2, lr_schedule="cosine")  # fmt: skip
    assert replace(spec, distill=True).model_id != spec.model_id  # part of the identity
    with pytest.raises(UserError, match="FP32 model has no teacher"):
        TrainSpec(dataset="imagenet", model="deit_tiny", image_size=32, distill=True)
    fp32 = build_model(replace(spec, method="fp32", bits=32), 10, 3, 32)
    weights = tmp_path / "fp32.pt"
    torch.save(fp32.state_dict(), weights)
    options = FinetuneOptions(store=str(tmp_path), data_root=str(tmp_path), weights=str(weights))
    assert _teacher(spec, options, 10, "cpu") is None  # not distilled: no teacher
    teacher = _teacher(replace(spec, distill=True), options, 10, "cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, fp32.state_dict()[k]) for k, v in teacher.state_dict().items())
    with pytest.raises(UserError, match="have a 10-class head; pass --weights deit_tiny=PATH"):
        _teacher(replace(spec, distill=True), options, 5, "cpu")  # its head would be random
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), torch.arange(4))]
    after = {}
    for with_teacher in (False, True):
        torch.manual_seed(1)
        student = build_model(spec, 10, 3, 32)
        optimizer = make_optimizer(spec, student)
        stats = train_epoch(student, batch, optimizer, torch.device("cpu"), 1, 2,
                            teacher=teacher if with_teacher else None)  # fmt: skip
        after[with_teacher] = (stats["loss_sum"], student.head.weight.detach().clone())
    assert after[False][0] == pytest.approx(after[True][0])  # the loss reported: CE alone
    assert not torch.equal(after[False][1], after[True][1])  # the step: CE + KL
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())
    assert all(p.grad is None for p in teacher.parameters())
