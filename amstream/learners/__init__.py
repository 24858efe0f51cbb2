"""Learners: every method behind one API (``step``, ``learn``, ``predict``, ``state_dict``)."""
from .altmin import AltMinLearner, AMAdam
from .ammem import AMMem
from .backprop import Backprop
from .base import Learner, NonFiniteStepError, Penalty, StepInfo

__all__ = ["Learner", "Penalty", "StepInfo", "NonFiniteStepError", "AltMinLearner", "AMAdam", "AMMem", "Backprop"]
