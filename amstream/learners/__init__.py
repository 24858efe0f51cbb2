"""Learners: every method behind one API (``step``, ``learn``, ``predict``, ``state_dict``)."""
from .altmin import AltMinLearner, AMAdam
from .ammem import AMMem
from .backprop import Backprop
from .base import Learner, NonFiniteStepError, StepInfo

__all__ = ["Learner", "StepInfo", "NonFiniteStepError", "AltMinLearner", "AMAdam", "AMMem", "Backprop"]
