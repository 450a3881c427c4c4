"""The paper's NiN population on CIFAR-10 (docs/method.md §2, QGen §4.2 / Appendix B.3).

3^5 = 243 models per precision x {FP32, int8, int4, int2} = 972 models; depth {2, 3, 4};
batch 128, 300 epochs, lr x0.1 at epochs 100 and 200; kept epoch = lowest training loss.

    python studies/nin_cifar10.py --data-root DIR [--storage s3://...] [--gpus-per-trial 0.25]
"""

from qgen_ray.pipeline.study import nin_population
from qgen_ray.pipeline.study_cli import main

STUDY = nin_population("cifar10", depths=[2, 3, 4])

if __name__ == "__main__":
    main(STUDY)
