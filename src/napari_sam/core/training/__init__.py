"""Training SAM-architecture models: data, the paper's prompt simulation, losses and the training loop."""

from .data import DataError, Sample, from_arrays, load_folder, load_split_folder
from .trainer import TrainConfig, Trainer, TrainingError, make_model

__all__ = ["DataError", "Sample", "TrainConfig", "Trainer", "TrainingError", "from_arrays", "load_folder",
           "load_split_folder", "make_model"]
