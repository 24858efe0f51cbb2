"""Learners: every method behind one API (``step``, ``learn``, ``predict``, ``state_dict``).

:data:`LEARNERS` is the registry: a learner registered here is available to ``scripts/stream.py``,
``scripts/continual.py``, ``scripts/rl.py``, ``scenarios.AMStrategy``, ``agents.DQNAgent`` and the
generated conformance tests, with its options derived from its ``defaults``.
"""
from .admm_rnn import ADMMiRNN
from .admm_softmax import ADMMSoftmax
from .altmin import AltMinLearner, AMAdam
from .am_rnn import AMRNN
from .ammem import AMMem
from .backprop import Backprop
from .base import Learner, LossFn, NonFiniteStepError, Penalty, StepInfo
from .blockwise import BlockLearner
from .dladmm import DLADMM
from .frank_wolfe import FrankWolfeLearner
from .groups import ParameterGroups
from .locoprop import LocoProp, LocoPropS
from .lowrank import SBE, SBPCA

#: name -> learner class (adding a learner: its module, one line here, its tests)
LEARNERS: dict[str, type[Learner]] = {
    "am-adam": AMAdam,
    "am-mem": AMMem,
    "backprop": Backprop,
    "locoprop-m": LocoProp,
    "locoprop-s": LocoPropS,
    "sbe": SBE,
    "sbpca": SBPCA,
    "admm-softmax": ADMMSoftmax,
    "dladmm": DLADMM,
    "frank-wolfe": FrankWolfeLearner,
    "admm-rnn": ADMMiRNN,
    "am-rnn": AMRNN,
}

__all__ = ["LEARNERS", "Learner", "BlockLearner", "ParameterGroups", "LossFn", "Penalty", "StepInfo",
           "NonFiniteStepError", "AltMinLearner", "AMAdam", "AMMem", "Backprop", "LocoProp", "LocoPropS",
           "SBE", "SBPCA", "ADMMSoftmax", "DLADMM", "FrankWolfeLearner", "ADMMiRNN", "AMRNN"]
