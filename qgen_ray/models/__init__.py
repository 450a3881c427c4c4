"""The model zoo: every model of the studies, built by name.

    from qgen_ray.models import create_model, MODELS
    model = create_model("nin", num_classes=10, depth=3, width=8)

`MODELS.names()` lists the registered names; `model_options(name)` a model's options.
Importing this package registers every model (one module per family).
"""

from qgen_ray.models import (  # noqa: F401  (imported to register their models)
    alexnet,
    cifar_resnet,
    mobilenet,
    nin,
    torchvision_models,
    vgg,
    vit,
)
from qgen_ray.models.registry import (
    MODELS,
    ModelEntry,
    count_params,
    create_model,
    model_library,
    model_options,
    register_model,
)
from qgen_ray.models.weights import load_fitting, read_weights_file

__all__ = [
    "MODELS",
    "ModelEntry",
    "count_params",
    "create_model",
    "load_fitting",
    "model_library",
    "model_options",
    "read_weights_file",
    "register_model",
]
