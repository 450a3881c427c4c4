"""ImageNet fine-tuning at FP32 / int8 / int4 / int2 (docs/method.md §7, QGen Appendix B.1, C.1).

CNNs (ResNet-18, ResNet-50, MobileNetV2) start from torchvision's pretrained weights and
train with LSQ (first and last layer at 8 bits): SGD lr 0.01, momentum 0.9, weight decay
1e-4, 120 epochs, lr x0.1 at 30/60/90. ViTs (DeiT-T, Swin-T) start from timm's weights
and follow VVTQ: AdamW lr 5e-4 with a cosine schedule, 120 epochs (our choice: the CNNs'
budget), weight decay 0.05 (DeiT's), no distillation unless --distill. Global batch 256
(torchvision's recipe), split over the DDP workers. Every run is one Ray Train DDP run; a
Tune grid over models x precisions drives them, several at once when the cluster holds
them. Then the fast sharpness / PAC-Bayes measures of every model (Table 3's ImageNet
rows), read from the training ImageFolder, and the report.

    python studies/imagenet_finetune.py --data-root /data/imagenet --workers 8 \\
        --weights resnet18=resnet18-f37072fd.pth resnet50=... [--pretrained-from-hub]
    python studies/imagenet_finetune.py --smoke --models resnet18 --workers 2 \\
        --data-root tiny/ --weights resnet18=r18.pt      # 2 epochs at 32 px, one precision
"""

from qgen_ray.imagenet.cli import main as finetune_main
from qgen_ray.pipeline.study import IMAGENET_SMOKE_PROTOCOL, Study, imagenet_cnns

# --smoke measures one search and the norm (all nine take minutes per CPU model)
SMOKE_MEASURES = {"measure": {"measures": ["pacbayes_init", "weight_norm"]}}

CNNS = imagenet_cnns(
    "imagenet_finetune",
    description="ImageNet fine-tuning of pretrained CNNs (LSQ) and ViTs (VVTQ) at four "
    "precisions with Ray Train DDP.",
    stages=("train", "measure", "report"),
    smoke_stage_options=SMOKE_MEASURES,
)

VITS = Study(
    name="imagenet_finetune",
    dataset="imagenet",
    model="deit_tiny",
    grid={"model": ["deit_tiny", "swin_tiny"]},
    precisions=(("fp32", 32), ("vvtq", 8), ("vvtq", 4), ("vvtq", 2)),
    protocol={
        "optimizer": "adamw",
        "lr": 5e-4,
        "lr_schedule": "cosine",
        "weight_decay": 0.05,
        "epochs": 120,
        "batch_size": 256,
        "image_size": 224,
    },
    smoke_grid={"model": ["deit_tiny"]},
    smoke_protocol=IMAGENET_SMOKE_PROTOCOL,
    smoke_precisions=(("vvtq", 4),),
    stages=("train", "measure", "report"),
    smoke_stage_options=SMOKE_MEASURES,
)

STUDIES = (CNNS, VITS)


def main(argv: list[str] | None = None) -> dict:
    return finetune_main(STUDIES, argv)


if __name__ == "__main__":
    main()
