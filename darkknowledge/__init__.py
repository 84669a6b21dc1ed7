"""darkknowledge: knowledge distillation for any PyTorch model.

The Python API mirrors the ``dk`` command line::

    import darkknowledge as dk
    teacher = dk.train("cnn1d", "mnist1d", epochs=20).model
    result = dk.distill("mlp", teacher, "mnist1d", losses={"kd": {"T": 4.0}}, epochs=20)
    print(result)              # what `dk distill` prints; result.model, result.accuracy, result.epochs
"""

from darkknowledge.api import distill, train
from darkknowledge.config import RunConfig, load_config
from darkknowledge.data import list_datasets, load_dataset
from darkknowledge.distiller import Distiller
from darkknowledge.losses import DistillLoss, Needs, Outputs, create_loss, list_losses, register_loss
from darkknowledge.models import create_model, list_models, register_model
from darkknowledge.runs.outcome import TrainResult
from darkknowledge.taps import FeatureTaps

__version__ = "0.1.0"

__all__ = [
    "DistillLoss",
    "Distiller",
    "FeatureTaps",
    "Needs",
    "Outputs",
    "RunConfig",
    "TrainResult",
    "create_loss",
    "create_model",
    "distill",
    "list_datasets",
    "list_losses",
    "list_models",
    "load_config",
    "load_dataset",
    "register_loss",
    "register_model",
    "train",
]
