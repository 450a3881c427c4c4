"""ImageNet: the ImageFolder on disk, ImageNet-C, and the ImageNet study scripts' flags
(QGen Appendix B.1 / C.1). Fine-tuning itself is `qgen_ray.train.finetune` (one rank,
plain PyTorch) run by Ray Train through `qgen_ray.ray.ddp`.

    imagefolder  checks, ImageNet transforms, sharded loaders
    imagenet_c   ImageNet-C evaluation of the fine-tuned models (the corrupt stage)
    cli          the flags of the ImageNet study scripts on top of pipeline.study_cli
"""
