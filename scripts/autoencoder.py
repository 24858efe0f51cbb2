#!/usr/bin/env python
"""LocoProp's experiment: a deep autoencoder trained by any registered learner, loss against epochs and time.

The deep autoencoder of the optimization literature (Hinton and Salakhutdinov, 2006; LocoProp, Amid,
Anil, Warmuth, AISTATS 2022): 784-1000-500-250-30-250-500-1000-784, tanh hidden layers, a linear
30-unit code, the sigmoid inside the loss: sigmoid cross-entropy summed over the pixels, averaged over
the batch of 1,000 images. Weights and biases start Glorot-uniform (as the official notebook), the
same for every run. Every run follows the reference's outer learning-rate schedule (a linear warmup
over 5 epochs, then a linear decay to 0 at epoch 100) for as many epochs as asked, so a 10-epoch run
is the first tenth of the reference's.

A run is ``LEARNER[:NAME=VALUE,...]``: a registered learner and its hyperparameters, where
``preset=P`` takes the class's ``presets[P]`` first (``locoprop-m:preset=reference`` are the official
notebook's settings) and ``optimizer=tf-rmsprop`` gives backprop TensorFlow 1's RMSProp.

    python scripts/autoencoder.py --dataset mnist --epochs 10
    python scripts/autoencoder.py --dataset fashion-mnist --epochs 10 --json ae-fashion.json
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _common import Parser, add_option  # noqa: E402
from _common import parse_run as _common_parse_run  # noqa: E402
from amstream import LEARNERS, set_seed  # noqa: E402
from amstream.data import load_fashion_mnist, load_mnist  # noqa: E402
from amstream.hparams import HParam  # noqa: E402
from amstream.optim import TFRMSprop  # noqa: E402
from amstream.utils import resolve_device  # noqa: E402

WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
DEFAULT_RUNS = ("locoprop-s:preset=reference", "locoprop-m:preset=reference",
                "backprop:optimizer=tf-rmsprop,lr=1e-5", "backprop:optimizer=adam,lr=1e-3")


def autoencoder() -> nn.Sequential:
    """The 784-1000-500-250-30-250-500-1000-784 tanh autoencoder, Glorot-uniform weights and biases."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        if i and WIDTHS[i] != 30:  # tanh after every layer but the linear code
            layers.append(nn.Tanh())
        linear = nn.Linear(a, b)
        nn.init.xavier_uniform_(linear.weight)
        bound = math.sqrt(3.0 / b)  # Glorot-uniform of a vector of b entries, as the notebook inits biases
        nn.init.uniform_(linear.bias, -bound, bound)
        layers.append(linear)
    return nn.Sequential(*layers)


def reconstruction_loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sigmoid cross-entropy summed over the pixels, averaged over the batch."""
    return F.binary_cross_entropy_with_logits(out, x.flatten(1), reduction="sum") / x.shape[0]


def _tf_rmsprop(name: str, key: str, value: str) -> dict | None:
    if key == "optimizer" and value == "tf-rmsprop":  # the reference's RMSProp settings for backprop
        return {"optimizer": TFRMSprop, "optimizer_kwargs": {"momentum": 0.999, "decay": 0.9, "eps": 1e-5}}
    return None


def parse_run(text: str) -> tuple[str, str, dict]:
    """``"backprop:optimizer=adam,lr=1e-3"`` -> ``(label, learner name, keyword arguments)``."""
    name, kwargs = _common_parse_run(text, _tf_rmsprop)
    return text, name, kwargs


def schedule(step: int, steps_per_epoch: int, warmup_epochs: int = 5, total_epochs: int = 100) -> float:
    """The reference's outer schedule: linear warmup from 0, then linear decay to 0 at the end."""
    warmup, total = warmup_epochs * steps_per_epoch, total_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / (total - warmup))


def train(label: str, name: str, kwargs: dict, data: torch.Tensor, args, device) -> dict:
    set_seed(args.seed)
    learner = LEARNERS[name](autoencoder(), device=device, **kwargs)
    steps = data.shape[0] // args.batch_size
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        learner.optimizer, lambda step: schedule(step, steps, total_epochs=args.schedule_epochs))
    generator = torch.Generator().manual_seed(args.seed)
    curve, elapsed = [], 0.0
    bar = tqdm(total=args.epochs * steps, desc=f"{label[:24]:>24}", disable=args.quiet, leave=False)
    for epoch in range(args.epochs):
        order = torch.randperm(data.shape[0], generator=generator)
        total, start = torch.zeros((), device=device), time.perf_counter()
        for i in range(steps):
            x = data[order[i * args.batch_size:(i + 1) * args.batch_size]].to(device)
            info = learner.step(x, lambda out, x=x: reconstruction_loss(out, x))
            total += info.loss
            scheduler.step()
            bar.update()
        epoch_loss = float(total) / steps  # the sync, once per epoch
        elapsed += time.perf_counter() - start
        curve.append((epoch + 1, epoch_loss, elapsed))
        bar.set_postfix(loss=f"{epoch_loss:.1f}")
        if not math.isfinite(epoch_loss):
            break
    bar.close()
    return {"label": label, "learner": name, "curve": curve, "hparams": learner.hparams()}


def main(argv=None) -> None:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist"), help="training images")
    p.add_argument("--data-dir", default=None, help="root of the data files (default: AMSTREAM_DATA)")
    p.add_argument("--run", action="append", default=None, metavar="LEARNER[:NAME=VALUE,...]",
                   help=f"a run (repeatable; default: {' '.join(DEFAULT_RUNS)})")
    add_option(p, "--epochs", HParam(10, "epochs per run", int, "[1, inf)"))
    add_option(p, "--schedule-epochs", HParam(100, "length of the outer schedule (the reference's 100)", int,
                                              "[6, inf)"))
    add_option(p, "--batch-size", HParam(1000, "images per step (the reference's 1,000)", int, "[1, inf)"))
    add_option(p, "--max-samples", HParam(None, "use the first N training images (default: all)", int, "[1, inf)",
                                          optional=True))
    add_option(p, "--threads", HParam(1, "torch CPU threads", int, "[1, inf)"))
    p.add_argument("--device", default="auto", help="torch device (auto: CUDA when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (the same for every run) and the order")
    p.add_argument("--json", default=None, help="write the curves to this JSON file")
    p.add_argument("--plot", default=None, help="PNG of loss against epochs and against time (default: runs/autoencoder-<dataset>.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        runs = [parse_run(text) for text in (args.run or DEFAULT_RUNS)]
        device = resolve_device(args.device)
        torch.set_num_threads(args.threads)
        loader = load_mnist if args.dataset == "mnist" else load_fashion_mnist
        images = loader("train", args.data_dir, normalize=False).x.flatten(1)  # pixels in [0, 1]: the targets
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    if args.max_samples:
        images = images[:args.max_samples]
    print(f"{args.dataset}: {images.shape[0]} images, autoencoder {'-'.join(map(str, WIDTHS))}, batch {args.batch_size}, "
          f"{args.epochs} epochs of a {args.schedule_epochs}-epoch schedule, device {device}", flush=True)
    results = []
    for label, name, kwargs in runs:
        results.append(train(label, name, kwargs, images, args, device))
        last = results[-1]["curve"][-1]
        print(f"{label}: epoch {last[0]} training loss {last[1]:.2f} after {last[2]:.0f} s", flush=True)
    print(f"\n| run | " + " | ".join(f"epoch {e}" for e in _shown(args.epochs)) + " | seconds |")
    print("|---|" + "---:|" * (len(_shown(args.epochs)) + 1))
    for r in results:
        by_epoch = {e: loss for e, loss, _ in r["curve"]}
        print(f"| {r['label']} | " + " | ".join(f"{by_epoch.get(e, float('nan')):.2f}" for e in _shown(args.epochs))
              + f" | {r['curve'][-1][2]:.0f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"options": vars(args), "results": results}, indent=1, default=str))
    import _plots

    plot = Path(args.plot) if args.plot else Path("runs") / f"autoencoder-{args.dataset}.png"
    _plots.plot_loss_curves({r["label"]: r["curve"] for r in results}, plot,
                            title=f"{args.dataset} deep autoencoder, batch {args.batch_size}")
    print(f"\nPlot: {plot}")


def _shown(epochs: int) -> list[int]:
    return sorted({1, 2, 5, 10, 20, 50, 100, epochs} & set(range(1, epochs + 1)))


if __name__ == "__main__":
    main()
