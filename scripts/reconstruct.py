#!/usr/bin/env python
"""Reconstruct an image from blocks of measurements with plug-and-play ADMM, full and incremental.

A test image (scikit-image's camera, moon, coins, phantom, or an MNIST / Fashion-MNIST digit) is
measured by an operator cut into blocks (compressive sensing, sparse-view CT, Gaussian blur), with
Gaussian noise at ``--noise-level`` times the measurements' RMS. Each denoiser is then plugged into
PnP-ADMM (every block per iteration) and its incremental variant (one block, or a mini-batch, per
iteration; Sun et al., IEEE TCI 2021). Denoisers:

- ``tv``: total variation (PnP-ADMM with it is ADMM for TV-regularized least squares);
- ``train:LEARNER[:NAME=VALUE,...]``: a DnCNN-style network trained here, by any registered learner
  that can fit it, on noisy patches of scikit-image's other images (never the test images);
- ``file:PATH``: a network saved before (``--save-denoisers DIR`` writes every trained one);
- ``identity``: no prior (the proximal point method on the data term).

Writes to ``--out`` (default ``runs/reconstruct-<time>``): PNGs of the ground truth, the back-projection
and every reconstruction, PSNR against iteration (``psnr.png``), ``results.json``, TensorBoard logs, and
a checkpoint per reconstruction every ``--checkpoint-every`` iterations (``--resume DIR`` continues).

    python scripts/reconstruct.py --image camera --operator ct --angles 60 --blocks 15
    python scripts/reconstruct.py --operator cs --ratio 0.3 --denoiser tv --denoiser train:am-adam:reduction=sum
    python scripts/reconstruct.py --image mnist:0 --size 0 --operator cs --ratio 0.5 --blocks 4 --denoiser tv
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from _common import Parser, clean_errors, make_learner, parse_run  # noqa: E402
from amstream import CheckpointError, load_checkpoint, resolve_device, save_checkpoint, set_seed  # noqa: E402
from amstream.logging import TensorBoardLogger, make_run_dir  # noqa: E402
from amstream.reconstruction import (OPERATORS, IdentityDenoiser, PnPADMM, TVDenoiser, back_projection,  # noqa: E402
                                     dncnn, load_denoiser, load_test_image,
                                     load_training_images, psnr, random_patches, save_denoiser, train_denoiser)
from amstream.reconstruction.denoisers import check_noise_level  # noqa: E402
from amstream.reconstruction.images import TRAINING_IMAGES  # noqa: E402

METHODS = ("full", "incremental")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    g = p.add_argument_group("problem")
    g.add_argument("--image", default="camera", help="test image: camera, moon, coins, phantom, mnist:K, fashion-mnist:K")
    g.add_argument("--size", type=int, default=128, help="resize the image to SIZE x SIZE (0: keep its own)")
    g.add_argument("--operator", choices=tuple(OPERATORS), default="ct",
                   help="cs: Gaussian compressive sensing; ct: parallel-beam tomography; blur: Gaussian blur")
    g.add_argument("--ratio", type=float, default=0.3, help="cs: measurements per pixel")
    g.add_argument("--angles", type=int, default=60, help="ct: projection angles in [0, 180)")
    g.add_argument("--blur-sigma", type=float, default=1.6, help="blur: kernel standard deviation in pixels")
    g.add_argument("--blocks", type=int, default=15, help="measurement blocks")
    g.add_argument("--noise-level", type=float, default=0.01,
                   help="measurement noise standard deviation, relative to the measurements' RMS (0.01: 40 dB)")
    g.add_argument("--cg-steps", type=int, default=10, help="conjugate-gradient steps of the ct/blur data step")
    g = p.add_argument_group("reconstruction")
    g.add_argument("--method", action="append", choices=METHODS, help="full and/or incremental (default: both)")
    g.add_argument("--iterations", type=int, default=30, help="iterations of the full method")
    g.add_argument("--incremental-iterations", type=int, default=None,
                   help="iterations of the incremental method (default: as many passes over the blocks as the "
                        "full method makes: ITERATIONS * BLOCKS / BLOCKS_PER_STEP)")
    g.add_argument("--blocks-per-step", type=int, default=1, help="incremental: blocks per iteration")
    g.add_argument("--order", choices=("random", "cyclic"), default="random", help="incremental: block order")
    g.add_argument("--gamma", type=float, default=1.0, help="weight of the data step")
    g.add_argument("--sigma", type=float, default=10.0, help="the network denoisers' noise level, on the 0-255 scale")
    g.add_argument("--tv-sigma", type=float, default=40.0,
                   help="the TV denoiser's noise level (0-255 scale): its prox weight is tau * sigma^2")
    g.add_argument("--tv-tau", type=float, default=1.0, help="TV prior weight")
    g = p.add_argument_group("denoisers")
    g.add_argument("--denoiser", action="append", metavar="SPEC",
                   help="tv, identity, train:LEARNER[:NAME=VALUE,...] or file:PATH (repeatable; "
                        "default: tv and train:backprop)")
    g.add_argument("--noise-range", default="1,50", help="training noise levels LOW,HIGH on the 0-255 scale")
    g.add_argument("--patches", type=int, default=4000, help="training patches")
    g.add_argument("--patch-size", type=int, default=32, help="training patch side")
    g.add_argument("--epochs", type=int, default=3, help="training epochs")
    g.add_argument("--batch-size", type=int, default=32, help="training batch size")
    g.add_argument("--features", type=int, default=32, help="DnCNN channels")
    g.add_argument("--depth", type=int, default=7, help="DnCNN convolutions")
    g.add_argument("--save-denoisers", default=None, metavar="DIR", help="write every trained denoiser here")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder (must be new or empty; default runs/reconstruct-<time>)")
    g.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its checkpoints")
    g.add_argument("--checkpoint-every", type=int, default=10, help="checkpoint every N iterations (0: never)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("iterations", "blocks", "blocks_per_step", "patches", "patch_size", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("gamma", "sigma", "tv_sigma", "tv_tau"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.noise_level < 0:
        p.error(f"--noise-level must be >= 0, got {args.noise_level}")
    try:
        low, high = (float(v) / 255 for v in args.noise_range.split(","))
    except ValueError:
        p.error(f"--noise-range must be LOW,HIGH (0-255 scale), got {args.noise_range!r}")
    if not 0 < low <= high:
        p.error(f"--noise-range needs 0 < LOW <= HIGH, got {args.noise_range!r}")
    args.noise_range = (low, high)
    args.method = args.method or list(METHODS)
    args.denoiser = args.denoiser or ["tv", "train:backprop"]
    return p, args


def make_operator(args, shape: tuple[int, int], device):
    kwargs = {"device": device}
    if args.operator == "cs":
        return OPERATORS["cs"](shape, args.ratio, args.blocks, seed=args.seed, **kwargs)
    if args.operator == "ct":
        return OPERATORS["ct"](shape, args.angles, args.blocks, cg_steps=args.cg_steps, **kwargs)
    return OPERATORS["blur"](shape, args.blur_sigma, args.blocks, cg_steps=args.cg_steps, **kwargs)


def measure(operator, image: torch.Tensor, level: float, seed: int) -> list[torch.Tensor]:
    """Noisy measurements: Gaussian noise of ``level`` times the clean measurements' RMS."""
    clean = operator.forward(image.to(operator.device))
    rms = float(torch.cat([y.flatten() for y in clean]).square().mean().sqrt())
    generator = torch.Generator().manual_seed(seed + 1)
    return [y + (level * rms * torch.randn(y.shape, generator=generator)).to(y) for y in clean]


def check_denoisers(args, device) -> dict[int, object]:
    """Parse every ``--denoiser`` and refuse a bad one before anything is written or trained.

    Returns the denoisers read from files, by position.
    """
    loaded = {}
    for k, spec in enumerate(args.denoiser):
        kind, _, rest = spec.partition(":")
        if kind in ("tv", "identity") and not rest:
            continue
        if kind == "file" and rest:
            loaded[k], _ = load_denoiser(rest, device)
            loaded[k].check_sigma(args.sigma / 255)
        elif kind == "train" and rest:
            parse_run(rest)  # an unknown learner or option fails here
            check_noise_level(args.sigma / 255, args.noise_range, f"DnCNN ({rest})")  # before it is trained
        else:
            raise ValueError(f"unknown denoiser {spec!r}: use tv, identity, train:LEARNER[:NAME=VALUE,...] or file:PATH")
    return loaded


def training_patches(args) -> torch.Tensor:
    """Patches of the training images: the digits' train split for a digit, scikit-image's others otherwise."""
    base = args.image.partition(":")[0]
    images = load_training_images(base if base in ("mnist", "fashion-mnist") else TRAINING_IMAGES)
    return random_patches(images, args.patches, min(args.patch_size, min(images[0].shape)), seed=args.seed)


def build_denoisers(args, loaded: dict, out: Path, device) -> list[tuple[str, object, float]]:
    """``(label, denoiser, sigma)`` per ``--denoiser``; networks trained here are saved in ``out`` (for resume)."""
    denoisers, patches = [], None
    for k, spec in enumerate(args.denoiser):
        kind, _, rest = spec.partition(":")
        if kind in ("tv", "identity"):
            denoisers.append((kind, TVDenoiser(args.tv_tau) if kind == "tv" else IdentityDenoiser(), args.tv_sigma / 255))
            continue
        denoiser = loaded.get(k)
        saved = out / f"denoiser-{k}.pt"
        if denoiser is None and saved.is_file():  # a resumed run takes the network it trained before
            denoiser, _ = load_denoiser(saved, device)
        if denoiser is None:
            name, kwargs = parse_run(rest)
            patches = training_patches(args) if patches is None else patches
            set_seed(args.seed)
            learner = make_learner(name, dncnn(args.features, args.depth), device, criterion=nn.MSELoss(), **kwargs)
            start = time.perf_counter()
            denoiser, losses = train_denoiser(learner, patches, args.noise_range, epochs=args.epochs,
                                              batch_size=args.batch_size, seed=args.seed, name=f"DnCNN ({rest})",
                                              progress=not args.quiet)
            seconds = time.perf_counter() - start
            print(f"trained {denoiser.name}: {len(losses)} steps in {seconds:.1f} s, final loss "
                  f"{sum(losses[-20:]) / len(losses[-20:]):.3g}")
            save_denoiser(saved, denoiser, learner=rest, seconds=seconds)
            if args.save_denoisers:
                save_denoiser(Path(args.save_denoisers) / f"dncnn-{slug(rest)}.pt", denoiser, learner=rest,
                              seconds=seconds)
        denoisers.append((denoiser.name, denoiser, args.sigma / 255))
    return denoisers


def save_png(image: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4.3))
    ax.imshow(image.detach().cpu().clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_psnr(curves: dict[str, list[tuple[int, float]]], bp_psnr: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label)
    ax.axhline(bp_psnr, color="gray", linestyle=":", label="back-projection")
    ax.set_xlabel("passes over the measurement blocks")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def slug(text: str) -> str:
    """``"full, DnCNN (am-adam)"`` -> ``"full-dncnn-am-adam"``: file names and TensorBoard tags."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def prepare_out(args) -> Path:
    if args.resume:
        out = Path(args.resume)
        if not (out / "options.json").is_file():
            raise ValueError(f"--resume {out}: no run there (options.json missing)")
        saved = json.loads((out / "options.json").read_text())
        for key in ("image", "size", "operator", "ratio", "angles", "blur_sigma", "blocks", "noise_level", "seed",
                    "denoiser", "method", "gamma", "sigma", "tv_sigma", "tv_tau", "blocks_per_step", "order"):
            if saved.get(key) != (list(getattr(args, key)) if isinstance(getattr(args, key), (list, tuple))
                                  else getattr(args, key)):
                raise ValueError(f"--resume {out}: --{key.replace('_', '-')} was {saved.get(key)!r} in that run, "
                                 f"not {getattr(args, key)!r}")
        return out
    if args.out:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"--out {out} exists and is not empty; nothing was overwritten (choose a new folder, "
                             "or --resume it)")
        out.mkdir(parents=True, exist_ok=True)
        return out
    return make_run_dir("runs", "reconstruct")


def main(argv=None) -> dict:
    parser, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with clean_errors(parser):
        device = resolve_device(args.device)
        image = load_test_image(args.image, args.size or None)
        operator = make_operator(args, tuple(image.shape), device)  # bad sizes fail here, before any file
        measurements = measure(operator, image, args.noise_level, args.seed)
        loaded = check_denoisers(args, device)  # bad specs and noise levels fail here, before any file
        out = prepare_out(args)
        (out / "options.json").write_text(json.dumps(vars(args), indent=1, default=str))
        denoisers = build_denoisers(args, loaded, out, device)
    reference = image.to(device)
    bp = back_projection(operator, measurements)
    bp_psnr = psnr(bp, reference)
    print(f"{operator.describe()}, {args.image} {tuple(image.shape)}, noise {args.noise_level:g} x RMS: "
          f"back-projection PSNR {bp_psnr:.2f} dB; writing to {out}")
    save_png(reference, out / "ground-truth.png", f"{args.image} (ground truth)")
    save_png(bp, out / "back-projection.png", f"back-projection, {bp_psnr:.2f} dB")
    logger = TensorBoardLogger(out / "tensorboard")
    rows, curves = [], {}
    for label, denoiser, sigma in denoisers:
        for method in args.method:
            incremental = method == "incremental"
            per_step = args.blocks_per_step if incremental else args.blocks
            total = (args.incremental_iterations or args.iterations * args.blocks // per_step) if incremental \
                else args.iterations
            pnp = PnPADMM(operator, denoiser, measurements, gamma=args.gamma, sigma=sigma, mode=method,
                          order=args.order, blocks_per_step=min(per_step, args.blocks), reference=reference,
                          seed=args.seed)
            name = f"{method}, {label}"
            ckpt = out / f"{slug(name)}.pt"
            history = []  # (iteration, PSNR, seconds, fixed-point residual) of every iteration, kept in checkpoints
            if args.resume and ckpt.is_file():
                try:
                    history = [tuple(h) for h in load_checkpoint(ckpt, pnp, restore_rng=False)["history"]]
                except CheckpointError as err:
                    parser.exit(2, f"{parser.prog}: error: {err}\n")
                print(f"{name}: resumed at iteration {pnp.iteration}")
            for _ in tqdm(range(pnp.iteration, total), desc=name, disable=args.quiet, leave=False):
                record = pnp.step()
                history.append((record.iteration, record.psnr, record.seconds, record.fixed_point_residual))
                for tag, value in record.diagnostics.items():
                    logger.record(f"{slug(name)}/{tag}", value, record.iteration)
                if args.checkpoint_every and record.iteration % args.checkpoint_every == 0:
                    save_checkpoint(ckpt, pnp, history=history)
            save_checkpoint(ckpt, pnp, history=history)
            final = psnr(pnp.x, reference)
            curves[name] = [(h[0] * per_step / args.blocks, h[1]) for h in history]
            save_png(pnp.x, out / f"{slug(name)}.png", f"{name}: {final:.2f} dB")
            rows.append({"method": method, "denoiser": label, "psnr": final, "iterations": pnp.iteration,
                         "seconds_per_iteration": sum(h[2] for h in history) / max(len(history), 1),
                         "fixed_point_residual": history[-1][3] if history else None})
    logger.close()
    if curves:
        plot_psnr(curves, bp_psnr, out / "psnr.png", operator.describe())
    print(f"\n{'method':12s} {'denoiser':28s} {'PSNR dB':>8s} {'iterations':>10s} {'s/iteration':>12s}")
    print(f"{'back-projection':41s} {bp_psnr:8.2f}")
    for row in rows:
        print(f"{row['method']:12s} {row['denoiser']:28s} {row['psnr']:8.2f} {row['iterations']:10d} "
              f"{row['seconds_per_iteration']:12.4f}")
    results = {"operator": operator.describe(), "image": args.image, "back_projection_psnr": bp_psnr, "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nImages, psnr.png, results.json, TensorBoard: {out}")
    return results


if __name__ == "__main__":
    main()
