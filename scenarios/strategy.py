"""``AMStrategy``: any amstream learner inside an Avalanche experiment, plugins and metrics included.

Avalanche's ``SupervisedTemplate`` trains by one backward pass of ``strategy.loss`` and one
``optimizer.step()``. Here each training iteration fires the same callbacks in the same order (the
order of ``SGDUpdate.training_epoch`` in avalanche-lib 0.6.0) and delegates the update to the
learner:

    before_training_iteration -> zero_grad -> before_forward -> forward -> after_forward
    -> loss += criterion -> before_backward (plugins add penalties) -> after_backward
    -> before_update -> learner.step(x, task loss, penalty) -> after_update
    -> after_training_iteration

- ``mb_output`` stays the logits, so accuracy and loss metrics work unchanged. In training they
  come from ``learner.forward_for_step``, the forward pass of the learner's next step, which the
  step then reuses: one forward pass per iteration and one set of dropout masks, as in Avalanche's
  own strategies. Their graph is the learner's: the whole network for backprop (so a ``Backprop``
  learner reproduces ``Naive`` and ``OnlineNaive`` exactly), the output layer only for learners
  that fit each layer to its own targets, where a distillation penalty (LwF) acts on that layer.
- Whatever plugins add to ``strategy.loss`` in ``before_backward`` (EWC, SI, MAS, RWalk, LwF) is
  handed to the learner as its ``penalty``: every layer adds the penalty's gradient to its own
  update (AM-mem: its output layer only; its hidden layers are exact memory solves).
- The optimizer slot holds ``learner.optimizer``: the learner's torch optimizer, or, for a learner
  that solves its weights exactly, a holder of its parameter groups whose ``step`` does nothing.
  Either way it has one named group per layer, so plugins and schedulers that call ``zero_grad``
  or read ``param_groups`` work. ``make_optimizer`` never regroups parameters: the learner owns
  them. The strategy uses the learner API only (``forward_for_step``, ``step``, ``optimizer``,
  ``sync_parameters``), so any registered learner works in it.
"""
from __future__ import annotations

import torch
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate

from amstream.functional import CriterionLoss
from amstream.learners import Learner

__all__ = ["AMStrategy", "UNSUPPORTED_PLUGINS", "seed_distributed_shuffling"]

#: plugins that assume one global backprop gradient, and why each cannot work with local updates
UNSUPPORTED_PLUGINS = {
    "GEMPlugin": "it projects one global gradient vector against stored gradients before a single step",
    "AGEMPlugin": "it projects one global gradient vector against a reference gradient before a single step",
    "MIRPlugin": "it takes a virtual SGD step on the global gradient to pick replay samples",
    "BiCPlugin": "it trains a bias-correction layer by end-to-end backprop (and is broken on torch 2.14)",
    "FromScratchTrainingPlugin": "it re-creates a single-group optimizer, which would drop the per-layer groups",
}


class AMStrategy(SupervisedTemplate):
    """Train an amstream learner (AM-Adam, AM-mem, backprop, ...) as an Avalanche strategy.

    Args:
        learner: the amstream learner; its model is the strategy's model.
        criterion: the task loss (default: the learner's criterion).
        train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator, eval_every,
            peval_mode: as in Avalanche's ``SupervisedTemplate``, except that ``device`` defaults
            to the learner's and ``eval_mb_size`` to 256 (Avalanche's 1 evaluates one sample per
            forward pass).

    Raises:
        ValueError: a plugin that needs one global backprop gradient (``UNSUPPORTED_PLUGINS``),
            or a learner that is not an amstream learner.
    """

    def __init__(
        self,
        *,
        learner: Learner,
        criterion=None,
        train_mb_size: int = 1,
        train_epochs: int = 1,
        eval_mb_size: int | None = 256,
        device=None,
        plugins=None,
        evaluator=default_evaluator,
        eval_every: int = -1,
        peval_mode: str = "epoch",
    ) -> None:
        if not isinstance(learner, Learner):
            raise ValueError(f"learner must be an amstream learner, got {type(learner).__name__}")
        for plugin in plugins or []:
            reason = UNSUPPORTED_PLUGINS.get(type(plugin).__name__)
            if reason is not None:
                raise ValueError(
                    f"{type(plugin).__name__} cannot be used with AMStrategy: {reason}; amstream "
                    "learners update each layer from its own local loss"
                )
        self.learner = learner
        self.last_step_info = None
        super().__init__(
            model=learner.model,
            optimizer=learner.optimizer,
            criterion=criterion if criterion is not None else learner.criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device if device is not None else learner.device,
            plugins=plugins,
            evaluator=evaluator,
            eval_every=eval_every,
            peval_mode=peval_mode,
        )

    # --------------------------------------------------------------------------------- optimizer
    def make_optimizer(self, reset_optimizer_state: bool = False, **kwargs) -> None:
        """The learner owns its per-layer optimizer: never regroup it. Recording the parameter ids
        keeps ``check_model_and_optimizer`` from calling this again within an experience.

        A plugin may have replaced ``strategy.model`` by another module (GDumb restarts from a copy
        of the initial model each experience): its weights are loaded into the learner's model,
        which stays the one that is trained and evaluated. A model that grew during Avalanche's
        model adaptation (``IncrementalClassifier``) has its new parameters put in their layer's
        named group (:meth:`Learner.sync_parameters`).
        """
        if self.model is not self.learner.model:
            self.learner.model.load_state_dict(self.model.state_dict())
            self.model = self.learner.model
        self.learner.sync_parameters()  # a grown output head (IncrementalClassifier) joins its group
        self.optimizer = self.learner.optimizer
        self.optimized_param_id = {name: p for name, p in self.model.named_parameters()}

    # ------------------------------------------------------------------------------- data loading
    def make_train_dataloader(self, num_workers=0, shuffle=True, pin_memory=None, persistent_workers=False,
                              drop_last=False, **kwargs):
        """Avalanche's training loader, except that memory is pinned only for worker processes.

        Avalanche pins by default whenever the device is CUDA. With ``num_workers=0`` that is one
        more copy of every batch in the main thread, before the transfer: measured on an H100,
        a plain AM-Adam epoch at batch 200 took 28% longer with a pinned loader. Pass
        ``pin_memory=True`` to ``train`` to get Avalanche's behaviour back.
        """
        if pin_memory is None:
            pin_memory = num_workers > 0 and torch.device(self.device).type == "cuda"
        super().make_train_dataloader(num_workers=num_workers, shuffle=shuffle, pin_memory=pin_memory,
                                      persistent_workers=persistent_workers, drop_last=drop_last, **kwargs)

    def _obtain_common_dataloader_parameters(self, **kwargs) -> dict:
        """Avalanche's loader arguments; in evaluation, without its distributed sampler.

        Under a process group Avalanche gives each process a shard of every loader, padded with
        repeated samples. For training that is the data parallelism (a data-parallel learner
        combines the shards' steps). Evaluated that way, each process's metrics would cover its
        shard only, with the repeats counted twice: every process evaluates the whole stream
        instead (their weights are the same, and so are their metrics; no gathering)."""
        args = super()._obtain_common_dataloader_parameters(**kwargs)
        if not self.is_training:
            args["distributed_sampling"] = False
        return args

    # ----------------------------------------------------------------------------------- forward
    def forward(self):
        if not self.is_training:
            return super().forward()
        # The learner's own training forward pass, reused by its step on this batch.
        return self.learner.forward_for_step(self.mb_x)

    # ------------------------------------------------------------------------------ the update
    def training_epoch(self, **kwargs) -> None:
        """One pass over the dataloader, firing ``SGDUpdate.training_epoch``'s callbacks in order."""
        seed_distributed_shuffling(self.dataloader)
        for self.mbatch in self.dataloader:
            if self._stop_training:
                break
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)

            self.optimizer.zero_grad()
            self.loss = self._make_empty_loss()

            self._before_forward(**kwargs)
            self.mb_output = self.forward()
            self._after_forward(**kwargs)

            self.loss += self.criterion()
            # Plugins add their penalties to self.loss, often in place: keep a graph-connected copy
            # so that the difference is exactly what they added, with its graph. A loss that was
            # neither replaced nor modified in place (same tensor, same version) got no penalty.
            loss_tensor, loss_version = self.loss, self.loss._version
            loss_before_plugins = self.loss.clone()

            self._before_backward(**kwargs)
            touched = self.loss is not loss_tensor or self.loss._version != loss_version
            penalty = self.loss - loss_before_plugins if touched else None
            self._after_backward(**kwargs)

            self._before_update(**kwargs)
            self.optimizer_step(penalty=penalty)
            self._after_update(**kwargs)

            self._after_training_iteration(**kwargs)

    def backward(self) -> None:
        """No global backward pass: the learner's step computes every layer's local gradient."""

    def optimizer_step(self, penalty=None) -> None:
        x, y, criterion = self.mb_x, self.mb_y, self._criterion
        has_penalty = isinstance(penalty, torch.Tensor) and penalty.requires_grad
        # the criterion as a loss of the output with its closed-form gradient where it has one (a
        # plain cross-entropy): the same step as learner.learn on this batch
        self.last_step_info = self.learner.step(
            x, CriterionLoss(criterion, y), penalty=penalty.squeeze() if has_penalty else None
        )
        # Plugins such as Synaptic Intelligence read p.grad after every iteration; layers that the
        # learner solves without gradients (AM-mem's hidden layers) report zero.
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)


def seed_distributed_shuffling(loader) -> None:
    """Make a shuffling Avalanche loader under a process group draw a new order every epoch, from
    torch's RNG (so from the run's seed), the same on every process.

    Avalanche 0.6.0's loaders (``MultiDatasetDataLoader``: the training loader, Replay's) build
    their ``DistributedSampler``s afresh at every pass, each with torch's default seed 0 and epoch 0:
    every epoch of every experience of the same data came in the same order, whatever the run's seed,
    where one process draws a new order each epoch. Here, each time the loader builds its samplers,
    one seed is drawn from torch's global RNG, broadcast from rank 0 (the shards of the processes must
    come from one permutation) and given to every shuffling sampler. One process, or a loader without
    a process group, is left as it is. (``_create_samplers`` is private to avalanche-lib 0.6.0, which
    the project pins.)"""
    create = getattr(loader, "_create_samplers", None)
    if create is None or getattr(loader, "_seeded_by_amstream", False) or not torch.distributed.is_initialized():
        return
    from torch.utils.data import DistributedSampler

    def seeded_samplers(*args, **kwargs):
        samplers = create(*args, **kwargs)
        shuffling = [s.sampler for s in samplers
                     if isinstance(getattr(s, "sampler", None), DistributedSampler) and s.sampler.shuffle]
        if shuffling:
            seed = [int(torch.randint(0, 2**31 - 1, ()))]
            torch.distributed.broadcast_object_list(seed, src=0)
            for sampler in shuffling:
                sampler.seed = seed[0]
        return samplers

    loader._create_samplers = seeded_samplers
    loader._seeded_by_amstream = True
