"""Optimizers that the learners use and torch.optim does not have."""
from .frank_wolfe import FrankWolfe
from .tf_rmsprop import TFRMSprop

__all__ = ["FrankWolfe", "TFRMSprop"]
