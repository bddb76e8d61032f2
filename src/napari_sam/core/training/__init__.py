"""Training SAM-architecture models: data, the paper's prompt simulation, losses and the training loop."""

from .data import DataError, Sample, from_arrays, load_folder, load_split_folder
from .finetune import finetune, finetune_iter
from .trainer import TrainConfig, Trainer, TrainingError, make_model

__all__ = ["DataError", "Sample", "TrainConfig", "Trainer", "TrainingError", "finetune", "finetune_iter",
           "from_arrays", "load_folder", "load_split_folder", "make_model"]
