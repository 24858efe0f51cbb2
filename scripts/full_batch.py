#!/usr/bin/env python
"""dlADMM's experiment: full-batch training of a ReLU MLP, test accuracy against iterations and time.

The protocol of Wang et al. (KDD 2019) and its reference code: MNIST (the first 55,000 training
images, the TF-tutorial split) or Fashion-MNIST (all 60,000), pixels in [0, 1], a 784-1000-1000-10
ReLU network by default, every iteration on the whole training set. One run per invocation (so that
each run's peak memory is its own process's):

- ``dladmm[:NAME=VALUE,...]``: :meth:`amstream.DLADMM.fit`, e.g. ``dladmm:preset=reference`` (the
  reference's rho 1e-6, backtracking, FISTA) or ``dladmm:step_size=bound``;
- ``gd:lr=...`` and ``adam:lr=...``: backprop gradient descent and Adam on the full batch (one step
  per iteration on the mean cross-entropy), the reference's baselines.

Weights start N(0, 0.1^2) as the reference's (drawn independently here).

    python scripts/full_batch.py --run dladmm:preset=reference --iterations 200
    python scripts/full_batch.py --run adam:lr=1e-3 --hidden 100,100 --iterations 200

A dlADMM run at width 1,000 takes hours on a CPU: ``--checkpoint run.pt`` writes the learner, its
auxiliaries and the curve every ``--checkpoint-every`` iterations (atomically: about 1 GB at width
1,000), and the same command with ``--resume`` continues from the last one, exactly:

    python scripts/full_batch.py --run dladmm:preset=reference --checkpoint runs/ref.pt
    python scripts/full_batch.py --run dladmm:preset=reference --checkpoint runs/ref.pt --resume
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from tqdm import tqdm  # noqa: E402

from _common import Parser  # noqa: E402
from amstream import DLADMM, CheckpointError, load_checkpoint, save_checkpoint, set_seed  # noqa: E402
from amstream.data import load_fashion_mnist, load_mnist  # noqa: E402

MARKS = (1, 10, 50, 100, 200, 500)


def network(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(nn.ReLU())
        linear = nn.Linear(a, b)
        nn.init.normal_(linear.weight, std=0.1)
        nn.init.normal_(linear.bias, std=0.1)
        layers.append(linear)
    return nn.Sequential(*layers)


def parse_run(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition(":")
    if name not in ("dladmm", "gd", "adam"):
        raise ValueError(f"unknown method {name!r} in {text!r}; choose dladmm, gd or adam")
    kwargs: dict = {}
    for item in filter(None, settings.split(",")):
        key, _, value = (part.strip() for part in item.partition("="))
        if key == "preset":
            if value not in DLADMM.presets:
                raise ValueError(f"dladmm has no preset {value!r}; it has {', '.join(DLADMM.presets)}")
            kwargs = {**DLADMM.presets[value], **kwargs}
            continue
        try:
            kwargs[key] = float(value) if key not in ("step_size", "z_solver") else value
        except ValueError:
            raise ValueError(f"{key}={value!r}: not a number") from None
    if name != "dladmm" and set(kwargs) - {"lr"}:
        raise ValueError(f"{name} takes lr only, got {sorted(kwargs)}")
    return name, kwargs


def main(argv=None) -> None:
    p = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist")
    p.add_argument("--data-dir", default=None, help="root of the data files (default: AMSTREAM_DATA)")
    p.add_argument("--run", required=True, help="METHOD[:NAME=VALUE,...]: dladmm, gd or adam")
    p.add_argument("--hidden", default="1000,1000", help="hidden widths (the reference's 1000,1000)")
    p.add_argument("--iterations", type=int, default=200, help="full-batch iterations (the reference's 200)")
    p.add_argument("--max-samples", type=int, default=None, metavar="N",
                   help="use the first N training images (default: all, 55,000 of MNIST, 60,000 of Fashion-MNIST; "
                        "fewer for a quick trial)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the curve here")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="dlADMM: save the run here every --checkpoint-every iterations and at its end")
    p.add_argument("--checkpoint-every", type=int, default=10, metavar="N")
    p.add_argument("--resume", action="store_true", help="continue the run saved at --checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        method, kwargs = parse_run(args.run)
        hidden = [int(w) for w in args.hidden.split(",") if w]
        if (args.iterations < 1 or not hidden or min(hidden) < 1 or args.checkpoint_every < 1
                or (args.max_samples is not None and args.max_samples < 1)):
            raise ValueError("--iterations, --checkpoint-every, --max-samples and every --hidden width must be >= 1")
        if (args.checkpoint or args.resume) and method != "dladmm":
            raise ValueError("--checkpoint and --resume are for dladmm runs (gd and adam take minutes)")
        if args.resume and not args.checkpoint:
            raise ValueError("--resume needs --checkpoint PATH, the run to continue")
        if args.resume and not Path(args.checkpoint).is_file():
            raise ValueError(f"--resume: no checkpoint at {args.checkpoint}")
        if args.checkpoint and not args.resume and Path(args.checkpoint).exists():
            raise ValueError(f"--checkpoint {args.checkpoint} exists: add --resume to continue it, or choose "
                             "another path")
        loader = load_mnist if args.dataset == "mnist" else load_fashion_mnist
        train = loader("train", args.data_dir, normalize=False)
        test = loader("test", args.data_dir, normalize=False)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    n_train = min(55_000 if args.dataset == "mnist" else 60_000, args.max_samples or len(train))
    x, y = train.x[:n_train].flatten(1).to(args.device), train.y[:n_train].to(args.device)
    xt, yt = test.x.flatten(1).to(args.device), test.y.to(args.device)
    model = network([784, *hidden, 10]).to(args.device)
    curve: list[tuple[int, float, float, float]] = []  # iteration, seconds, test accuracy, training cost

    bar = tqdm(total=args.iterations, desc=args.run, unit="it", disable=args.quiet, dynamic_ncols=True)

    def evaluate(it: int, seconds: float) -> None:
        with torch.no_grad():
            acc = float((model(xt).argmax(1) == yt).float().mean())
            cost = float(F.cross_entropy(model(x), y))
        curve.append((it, seconds, acc, cost))
        bar.set_postfix(test=f"{acc:.4f}", cost=f"{cost:.4f}", refresh=False)
        bar.update(it - bar.n)

    print(f"{args.dataset}: {n_train} training images, full batch, 784-{'-'.join(map(str, hidden))}-10 ReLU, "
          f"{args.run}, {args.iterations} iterations, {args.threads} thread(s), {args.device}")
    peak_before = 0.0
    if method == "dladmm":
        try:
            learner = DLADMM(model, device=args.device, **kwargs)
        except ValueError as err:
            p.error(f"--run {args.run}: {err}")
        run_options = {key: getattr(args, key) for key in ("dataset", "run", "hidden", "seed")}
        if args.max_samples:  # only when set: checkpoints of whole-data runs keep their options
            run_options["max_samples"] = n_train
        if args.resume:
            try:
                saved = load_checkpoint(args.checkpoint, learner)
            except CheckpointError as err:
                p.error(str(err))
            if saved["options"] != run_options:
                p.error(f"--resume: {args.checkpoint} holds the run {saved['options']}, not {run_options}")
            curve[:] = [tuple(point) for point in saved["curve"]]
            peak_before = saved["peak_mb"]
            print(f"resumed at iteration {learner.fit_run.iteration} from {args.checkpoint}")
            bar.n = bar.last_print_n = learner.fit_run.iteration

        def after_iteration(it: int, record: dict) -> None:
            evaluate(it, record["seconds"])
            if args.checkpoint and (it % args.checkpoint_every == 0 or it == args.iterations):
                save_checkpoint(args.checkpoint, learner, options=run_options, curve=curve, peak_mb=max(
                    peak_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))

        learner.fit(x, y, iterations=args.iterations, callback=after_iteration, resume=args.resume)
    else:
        lr = kwargs.get("lr", 1e-3 if method == "adam" else 0.1)
        opt = torch.optim.Adam(model.parameters(), lr=lr) if method == "adam" else torch.optim.SGD(model.parameters(), lr=lr)
        start, paused = time.perf_counter(), 0.0
        for it in range(1, args.iterations + 1):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            t0 = time.perf_counter()
            evaluate(it, t0 - start - paused)
            paused += time.perf_counter() - t0
    bar.close()
    peak_mb = max(peak_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    seconds = curve[-1][1]
    marks = {it: acc for it, _, acc, _ in curve if it in MARKS}
    print(" ".join(f"iteration {it}: {acc:.4f}" for it, acc in marks.items()))
    print(f"{seconds / len(curve):.2f} s per iteration, peak resident memory {peak_mb:.0f} MB, "
          f"final training cost {curve[-1][3]:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"options": vars(args), "curve": curve, "peak_mb": peak_mb,
                                               "seconds_per_iteration": seconds / len(curve)}, indent=1))
        print(f"Results: {args.json}")


if __name__ == "__main__":
    main()
