"""The paper's distortion study on ImageNet (QGen §4.3, Appendix C; docs/method.md §6).

ResNet-18, MobileNetV2 and ResNet-50 fine-tuned at FP32 / int8 / int4 / int2 exactly as in
studies/imagenet_finetune.py (same protocol, so the same model ids), then every model on
ImageNet-C's 15 corruptions x 5 severities: gap = corrupted loss - clean training loss
(Tables 4-6 of the report). ImageNet-C must be downloaded (zenodo.org/records/2235448):
it is not generated on the fly. Models already fine-tuned by imagenet_finetune need no
retraining: `qgen corrupt results/imagenet_finetune --data-root ... --corrupt-root ...`.

    python studies/corruption_imagenet.py --data-root /data/imagenet --workers 8 \\
        --corrupt-root /data/imagenet-c --weights resnet18=resnet18-f37072fd.pth ...
    python studies/corruption_imagenet.py --stages corrupt report --data-root ... \\
        --corrupt-root ... --corruptions gaussian_noise fog --severities 1 5
    python studies/corruption_imagenet.py --smoke --data-root tiny/ --corrupt-root tiny-c/ \\
        --weights resnet18=r18.pt            # resnet18 FP32 + int2, 2 epochs at 32 px
"""

from qgen_ray.imagenet.cli import main as finetune_main
from qgen_ray.pipeline.study import imagenet_cnns

STUDY = imagenet_cnns(
    "corruption_imagenet",
    description="ImageNet ResNet-18 / MobileNetV2 / ResNet-50 at four precisions on ImageNet-C.",
    stages=("train", "corrupt", "report"),
    smoke_precisions=(("fp32", 32), ("lsq", 2)),
)


def main(argv: list[str] | None = None) -> dict:
    return finetune_main((STUDY,), argv)


if __name__ == "__main__":
    main()
