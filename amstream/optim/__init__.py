"""Optimizers that the learners use and torch.optim does not have."""
from .tf_rmsprop import TFRMSprop

__all__ = ["TFRMSprop"]
