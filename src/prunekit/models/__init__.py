"""The prunekit model zoo. Importing this package registers every model."""

from prunekit.models import lenet, mobilenet, resnet_cifar, vgg, vit  # noqa: F401  (registration side effects)
from prunekit.models.registry import (
    ModelInfo,
    create_model,
    create_model_for_dataset,
    get_model_info,
    list_models,
    register_model,
)

__all__ = [
    "ModelInfo",
    "create_model",
    "create_model_for_dataset",
    "get_model_info",
    "list_models",
    "register_model",
]
