"""ImageNet fine-tuning with DistributedDataParallel on Ray Train (QGen Appendix B.1).

    imagefolder  the ImageFolder on disk: checks, ImageNet transforms, sharded loaders
    loop         one rank's fine-tuning run (`finetune`): plain PyTorch, no Ray
    runner       Ray Train inside Ray Tune: one TorchTrainer per model (`run_finetune`)
    corrupt      ImageNet-C evaluation of the fine-tuned models (the corrupt stage)
    cli          the flags of the ImageNet study scripts on top of qgen_ray.study_cli

Only `runner` imports Ray.
"""

from qgen_ray.ddp.imagefolder import check_imagefolder, eval_transform, train_transform
from qgen_ray.ddp.loop import FinetuneOptions, finetune

__all__ = ["FinetuneOptions", "check_imagefolder", "eval_transform", "finetune", "train_transform"]
