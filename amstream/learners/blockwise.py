"""The base of methods that work layer by layer: the model as an explicit list of blocks.

Alternating minimization (and, later, LocoProp or dlADMM) fits every layer to its own input and
target, so it needs the network as blocks ``lin(pre(c))`` whose outputs are the *codes*
(:mod:`amstream.blocks`). :class:`BlockLearner` decomposes the ``nn.Sequential`` once, loudly,
names one parameter group per block, and checks at the first batch that every Linear block sees one
vector per sample.
"""
from __future__ import annotations

import torch
from torch import nn

from ..blocks import Blocks, blocks_from_sequential
from ..validation import InputError
from .base import Learner

__all__ = ["BlockLearner"]


class BlockLearner(Learner):
    """A learner whose model is an ``nn.Sequential`` split into blocks (``self.blocks``).

    Raises:
        UnsupportedModelError: the model is not a Sequential of Linear/Conv/BatchNorm code layers
            and parameter-free modules (the message names the layer that does not fit).
    """

    def __init__(self, model: nn.Module, **kwargs) -> None:
        self.blocks: Blocks = blocks_from_sequential(model)  # before the first probe, which runs them
        super().__init__(model, **kwargs)

    def _named_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        return [(f"block{b.index}", b.parameters()) for b in self.blocks if b.parameters()]

    def _probe(self, sample_shape: tuple, dtype: torch.dtype | None) -> torch.Tensor:
        """The zero-sample probe, run block by block: a Linear block must receive one vector per
        sample, or its codes would not be the ``(batch, features)`` matrices the updates assume."""
        dtype = dtype or next(self.model.parameters()).dtype
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                c = torch.zeros((1, *sample_shape), dtype=dtype, device=self.device)
                for block in self.blocks:
                    inner = block.pre(c)
                    if isinstance(block.weight_layer, nn.Linear) and inner.dim() != 2:
                        raise InputError(
                            f"inputs of sample shape {tuple(sample_shape)} reach the Linear layer of block "
                            f"{block.index} with shape {tuple(inner.shape)}: a block-wise learner needs one "
                            "vector per sample there. Flatten the samples (nn.Flatten), or train a sequence "
                            "model with a learner that accepts any module (backprop)")
                    c = block.post(block.lin(inner))
                return c
        finally:
            self.model.train(was_training)

    def _linear_whole_step_states(self, views: list, groups: list[dict], loss_fn, penalty) -> list | None:
        """:meth:`Learner._whole_step_states` for Linear blocks ``views`` trained by the parameter
        groups ``groups`` (one each, holding exactly the block's weight and bias, and its BatchNorm's),
        or None: also where the task loss has no closed-form gradient (autograd would break the graph)."""
        if getattr(loss_fn, "gradient", None) is None or getattr(loss_fn, "kind", "closed form") is None:
            return None  # (a CriterionLoss whose criterion has no closed form has kind None)
        params = [[p for p in (view.linear.weight, view.linear.bias) if p is not None]
                  + ([view.bn.weight, view.bn.bias] if view.bn is not None else []) for view in views]
        if [list(map(id, g["params"])) for g in groups] != [list(map(id, ps)) for ps in params]:
            return None
        return self._whole_step_states(list(zip(groups, params)), penalty)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(blocks={len(self.blocks)}, device={self.device}, "
                f"steps={self.step_count})")
