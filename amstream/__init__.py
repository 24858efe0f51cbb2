"""amstream: online continual learning without end-to-end backpropagation.

The heart is online alternating minimization with auxiliary variables (Choromanska et al., ICML
2019): every layer's output is a free *code*; per sample or mini-batch the codes are updated from
the top layer down, then every layer's weights are fitted to its own input and output codes.
"""
from .blocks import Sign, Step, StraightThrough, UnsupportedModelError, blocks_from_sequential
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .hparams import HParam
from . import learners as _learners
from .learners import *  # noqa: F403 - every learner class and the registry, as amstream.learners lists them
from .stream import PrequentialResult, iter_prequential, prequential
from .utils import resolve_device, set_seed
from .validation import InputError

__version__ = "0.1.0"

__all__ = [
    *_learners.__all__, "HParam",
    "InputError", "UnsupportedModelError",
    "blocks_from_sequential", "Sign", "Step", "StraightThrough",
    "prequential", "iter_prequential", "PrequentialResult",
    "save_checkpoint", "load_checkpoint", "CheckpointError",
    "resolve_device", "set_seed",
]
