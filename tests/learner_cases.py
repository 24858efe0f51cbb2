"""The learner configurations of the conformance suite, generated from ``amstream.LEARNERS``.

Every registered learner class contributes its ``conformance_cases`` (name suffix -> spec), each
with a test model chosen by name. A learner registered later is picked up here with no edit: by
default it is checked on the MLP with its own defaults.

A spec may hold:
  kwargs: constructor keywords of the case;
  model: "mlp" (default), "mlp-bn", "cnn", "gru" or "elman" (the last two read the digits as
    sequences of 8 rows of 8 pixels: nn.GRU, and amstream.models.ElmanRNN);
  one_sample: (kwargs over the case's, accuracy floor) for the stream of single samples;
  accuracy: the held-out accuracy floor after two passes over the digits (default 0.55).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import amstream
from amstream.models import ElmanRNN


def mlp(batchnorm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, 32)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(32))
    layers += [nn.ReLU(), nn.Linear(32, 32)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(32))
    layers += [nn.ReLU(), nn.Linear(32, 10)]
    return nn.Sequential(*layers)


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


class GRUClassifier(nn.Module):
    """A sequence classifier: a GRU over the time steps, a Linear layer on the last hidden state."""

    def __init__(self, n_features: int = 8, hidden: int = 32, n_classes: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(n_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x)
        return self.head(h[-1])


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """Digits ``(B, 1, 8, 8)`` as sequences ``(B, 8 time steps, 8 features)``."""
    return x.reshape(x.shape[0], 8, 8)


#: model name -> (factory, has BatchNorm, input adapter from digits (B, 1, 8, 8), declared sample shape)
MODELS = {
    "mlp": (mlp, False, lambda x: x, (1, 8, 8)),
    "mlp-bn": (lambda: mlp(batchnorm=True), True, lambda x: x, (1, 8, 8)),
    "cnn": (small_cnn, False, lambda x: x, (1, 8, 8)),
    "gru": (GRUClassifier, False, as_rows, (None, 8)),
    "elman": (lambda: ElmanRNN(8, 32, 10), False, as_rows, (None, 8)),
}


@dataclass
class Case:
    """One configuration: a registered learner, its keywords and its test model."""

    registry_name: str
    kwargs: dict = field(default_factory=dict)
    model: str = "mlp"
    one_sample: tuple[dict, float] = ({}, 0.2)
    accuracy: float = 0.55

    @property
    def cls(self) -> type:
        return amstream.LEARNERS[self.registry_name]

    @property
    def has_batchnorm(self) -> bool:
        return MODELS[self.model][1]

    @property
    def sample_shape(self) -> tuple:
        return MODELS[self.model][3]

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return MODELS[self.model][2](x)

    def make(self, seed: int = 0, device: str = "cpu", dtype: torch.dtype | None = None, **kwargs):
        torch.manual_seed(seed)
        model = MODELS[self.model][0]()
        if dtype is not None:
            model = model.to(dtype)
        return self.cls(model, device=device, **{**self.kwargs, **kwargs})


def conformance_cases() -> dict[str, Case]:
    """``{"am-adam": Case, "am-adam-official": Case, ..., "backprop-gru": Case}`` over the registry."""
    cases = {}
    for name, cls in amstream.LEARNERS.items():
        for suffix, spec in cls.conformance_cases.items():
            unknown = set(spec) - {"kwargs", "model", "one_sample", "accuracy"}
            assert not unknown, f"{cls.__name__}.conformance_cases[{suffix!r}] has unknown keys {unknown}"
            assert spec.get("model", "mlp") in MODELS, f"{cls.__name__}: unknown test model {spec.get('model')!r}"
            case = Case(name, dict(spec.get("kwargs", {})), spec.get("model", "mlp"),
                        spec.get("one_sample", ({}, 0.2)), spec.get("accuracy", 0.55))
            cases[f"{name}-{suffix}" if suffix else name] = case
    return cases


def batches(data, size: int = 32, n: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)
    out = [(data.x[order[i:i + size]], data.y[order[i:i + size]]) for i in range(0, len(data) - size + 1, size)]
    return out[:n] if n else out
