#!/usr/bin/env python
"""The reconstruction benchmark of BENCHMARKS.md: incremental PnP-ADMM against the full method.

Parts (``--part``, repeatable, run in this order; each writes JSON into ``--out``):

- ``denoisers``: a DnCNN-style network trained by each ``--learner`` run (backprop-Adam and AM-Adam by
  default) on the same noisy patches of scikit-image's training images; denoising PSNR on the
  four test images at two noise levels. The networks are saved for the other parts.
- ``drift``: each network applied to its own output 60 times from a clean test image.
- ``tune``: PnP's gamma and sigma per operator family, denoiser, method and noise level
  (``--tune-noise``), on a tuning image that is not a test image (``--tune-image``, default
  scikit-image's ``astronaut``, from the training pool), at CS 0.3 and CT 60.
- ``table``: every test image at ``--size`` x ``--size``, compressive sensing at ratios 0.1, 0.3,
  0.5 and sparse-view CT at 30 and 60 angles, measurement noise at two levels: PSNR of the
  back-projection, TV-regularized reconstruction (ADMM with the TV prox), and full and incremental
  PnP-ADMM with each network.
- ``minibatch``: camera, CS 0.3 and CT 60: incremental PnP-ADMM with mini-batches of 1, 2, 4 and 8
  blocks per iteration against the full method, with the backprop-trained network.
- ``scaling``: CT with blocks of ``--angles-per-block`` angles and 4, 16, 64, 256 blocks (so 16 to
  1,024 angles): seconds per iteration, peak memory of the process and PSNR of the full method
  (its sampling grids kept, or rebuilt per call) and the incremental one, each run in its own process.

    python scripts/bench_reconstruct.py --part denoisers --part tune --part table --threads 1
    python scripts/bench_reconstruct.py --part scaling --threads 1
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import Parser, make_learner, parse_run  # noqa: E402
from amstream import set_seed  # noqa: E402
from amstream.reconstruction import (GaussianSensing, ParallelBeamCT, PnPADMM, TVDenoiser, back_projection,  # noqa: E402
                                     dncnn, denoising_psnr, load_denoiser, load_test_image, load_training_images,
                                     psnr, random_patches, save_denoiser, train_denoiser)
from amstream.reconstruction.images import TEST_IMAGES  # noqa: E402
from reconstruct import measure  # noqa: E402

PARTS = ("denoisers", "drift", "tune", "table", "minibatch", "scaling")
DEFAULT_LEARNERS = ["backprop", "am-adam:reduction=sum,lr=0.001,lr_out=0.001,code_lr=0.1"]
#: (label, family, operator keywords, blocks): the table's problems
PROBLEMS = [("CS 0.1", "cs", {"ratio": 0.1}, 16), ("CS 0.3", "cs", {"ratio": 0.3}, 16),
            ("CS 0.5", "cs", {"ratio": 0.5}, 16), ("CT 30", "ct", {"n_angles": 30}, 10),
            ("CT 60", "ct", {"n_angles": 60}, 15)]
NOISE_LEVELS = (0.01, 0.05)  # relative to the measurements' RMS: 40 dB and 26 dB input SNR


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--part", action="append", choices=PARTS, help="parts to run (default: all, in order)")
    p.add_argument("--out", default="runs/bench-reconstruct", help="results and trained networks")
    p.add_argument("--size", type=int, default=128, help="test images are resized to SIZE x SIZE")
    p.add_argument("--learner", action="append", metavar="LEARNER[:NAME=VALUE,...]",
                   help=f"denoiser trainers (default: {' and '.join(DEFAULT_LEARNERS)})")
    p.add_argument("--patches", type=int, default=6000, help="training patches")
    p.add_argument("--patch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--noise-range", default="1,50", help="training noise levels, 0-255 scale")
    p.add_argument("--full-iterations", type=int, default=40)
    p.add_argument("--incremental-iterations", type=int, default=300)
    p.add_argument("--images", default=",".join(TEST_IMAGES), help="table: test images")
    p.add_argument("--problems", default=None, help="table: only these problems (e.g. 'CT 60'; default: all)")
    p.add_argument("--tune-image", default="astronaut", help="tune: an image of the training pool")
    p.add_argument("--tune-families", default="cs,ct", help="tune: operator families (cs, ct), e.g. one per process")
    p.add_argument("--tune-noise", type=float, default=NOISE_LEVELS[0], help="tune: the measurement noise level")
    p.add_argument("--noise", type=float, default=None, help="table: only this noise level (default: both)")
    p.add_argument("--angles-per-block", type=int, default=4, help="scaling: angles per block")
    p.add_argument("--block-counts", default="4,16,64,256", help="scaling: numbers of blocks")
    p.add_argument("--scaling-iterations", type=int, default=6,
                   help="scaling: iterations of the full method per run (the incremental one makes as many passes "
                        "over the blocks: ITERATIONS x BLOCKS iterations)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one scaling run, in a fresh process
    args = p.parse_args(argv)
    args.part = args.part or list(PARTS)
    args.learner = args.learner or DEFAULT_LEARNERS
    low, high = (float(v) / 255 for v in args.noise_range.split(","))
    args.noise_range = (low, high)
    return args


def _label(spec: str) -> str:
    return spec.partition(":")[0]


def _write(out: Path, name: str, payload) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))


def part_denoisers(args, out: Path) -> None:
    patches = random_patches(load_training_images(), args.patches, args.patch_size, seed=args.seed)
    tests = [load_test_image(name, args.size) for name in TEST_IMAGES]
    rows = []
    for spec in args.learner:
        name, kwargs = parse_run(spec)
        set_seed(args.seed)
        learner = make_learner(name, dncnn(), "cpu", criterion=nn.MSELoss(), **kwargs)
        start = time.perf_counter()
        denoiser, losses = train_denoiser(learner, patches, args.noise_range, epochs=args.epochs, batch_size=32,
                                          seed=args.seed, name=f"DnCNN ({_label(spec)})", progress=True)
        seconds = time.perf_counter() - start
        save_denoiser(out / f"dncnn-{_label(spec)}.pt", denoiser, learner=spec, seconds=seconds)
        row = {"learner": spec, "seconds": seconds, "final_loss": sum(losses[-50:]) / 50}
        for sigma in (15, 25):
            row[f"noisy_{sigma}"], row[f"denoised_{sigma}"] = denoising_psnr(denoiser, tests, sigma / 255, seed=1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    _write(out, "denoisers", rows)


def part_drift(args, out: Path) -> None:
    """Each network applied to its own output 60 times from a clean test image (sigma 5/255): how far
    it drifts when nothing pulls it back, as in an iteration whose data steps are weak."""
    rows = []
    for name, denoiser in _denoisers(args, out)[1:]:
        for image_name in TEST_IMAGES:
            image = x = load_test_image(image_name, args.size)
            for k in range(1, 61):
                x = denoiser(x, 5 / 255)
                if k in (1, 10, 30, 60):
                    rows.append({"denoiser": name, "image": image_name, "applications": k, "psnr": psnr(x, image),
                                 "mean_shift": float(x.mean() - image.mean())})
    for row in rows:
        print(json.dumps(row), flush=True)
    _write(out, "drift", rows)


def _denoisers(args, out: Path) -> list[tuple[str, object]]:
    found = [("TV", TVDenoiser(1.0))]
    for spec in args.learner:
        denoiser, _ = load_denoiser(out / f"dncnn-{_label(spec)}.pt")
        found.append((denoiser.name, denoiser))
    return found


def _operator(family: str, shape, kwargs: dict, blocks: int, seed: int):
    if family == "cs":
        return GaussianSensing(shape, kwargs["ratio"], blocks, seed=seed)
    return ParallelBeamCT(shape, kwargs["n_angles"], blocks)


def _reconstruct(op, denoiser, ys, image, gamma, sigma, mode, iterations, seed, blocks_per_step=1):
    pnp = PnPADMM(op, denoiser, ys, gamma=gamma, sigma=sigma, mode=mode, reference=image, seed=seed,
                  blocks_per_step=blocks_per_step)
    records = []
    try:
        for _ in range(iterations):
            records.append(pnp.step())
    except FloatingPointError:  # the iteration diverged: recorded as such, the table goes on
        return {"psnr": float("nan"), "diverged_at": pnp.iteration + 1,
                "seconds_per_iteration": sum(r.seconds for r in records) / max(len(records), 1)}
    return {"psnr": psnr(pnp.x, image), "best_psnr": max(r.psnr for r in records),
            "seconds_per_iteration": sum(r.seconds for r in records) / len(records)}


#: the tuning grids (sigma on the 0-255 scale; the networks know 1-50). The incremental method takes
#: far smaller data steps than the full one at its best: its step weighs one block as b blocks.
GAMMAS = {"full": (2.0, 8.0, 32.0), "incremental": (0.5, 2.0, 8.0, 32.0)}
SIGMAS = {"TV": (40, 80, 160), "full": (10, 20, 40), "incremental": (2.5, 5, 10, 20)}


def part_tune(args, out: Path) -> None:
    """Each method's best (gamma, sigma) per operator family and denoiser, on the tuning image."""
    from amstream.reconstruction.images import _gray
    from skimage.transform import resize

    image = torch.from_numpy(resize(_gray(args.tune_image), (args.size, args.size), anti_aliasing=True)).float()
    settings = _tuned(out)  # what an interrupted tuning found is kept
    for label, family, kwargs, blocks in (PROBLEMS[1], PROBLEMS[4]):
        if family not in args.tune_families:
            continue
        op = _operator(family, image.shape, kwargs, blocks, args.seed)
        ys = measure(op, image, args.tune_noise, args.seed)
        for name, denoiser in _denoisers(args, out):
            for mode in ("full",) if name == "TV" else ("full", "incremental"):
                key = _key(family, name, mode, args.tune_noise)
                if key in settings:
                    continue
                iterations = 30 if mode == "full" else args.incremental_iterations // 2
                trials = []
                for gamma in GAMMAS[mode]:
                    for sigma in SIGMAS["TV" if name == "TV" else mode]:
                        result = _reconstruct(op, denoiser, ys, image, gamma, sigma / 255, mode, iterations, args.seed)
                        trials.append((result["psnr"], gamma, sigma))
                best = max(trials)
                settings[key] = {"gamma": best[1], "sigma": best[2], "tuning_psnr": best[0]}
                print(f"tune {label} {name} {mode}: gamma {best[1]}, sigma {best[2]} ({best[0]:.2f} dB on "
                      f"{args.tune_image})", flush=True)
                _write(out, f"tuned-{family}-{args.tune_noise:g}",
                       {k: v for k, v in settings.items() if k.startswith(family + "/") and k.endswith(f"@{args.tune_noise:g}")})


def _key(family: str, denoiser: str, mode: str, noise: float) -> str:
    """The tuned settings' key: ``"ct/DnCNN (backprop)/incremental@0.01"``."""
    return f"{family}/{denoiser}/{mode}@{noise:g}"


def _tuned(out: Path) -> dict:
    """The tuned settings of every family (``tuned-<family>.json``)."""
    settings = {}
    for path in sorted(out.glob("tuned-*.json")):
        settings.update(json.loads(path.read_text()))
    return settings


def part_table(args, out: Path) -> None:
    settings = _tuned(out)
    denoisers = _denoisers(args, out)
    rows = []
    images = {name: load_test_image(name, args.size) for name in args.images.split(",")}
    for label, family, kwargs, blocks in PROBLEMS:  # one operator per problem: its factors serve every image
        if args.problems and label not in args.problems.split(","):
            continue
        op = _operator(family, (args.size, args.size), kwargs, blocks, args.seed)
        for image_name, image in images.items():
            for level in NOISE_LEVELS if args.noise is None else (args.noise,):
                ys = measure(op, image, level, args.seed)
                row = {"image": image_name, "problem": label, "blocks": blocks, "noise": level,
                       "back_projection": psnr(back_projection(op, ys), image)}
                for name, denoiser in denoisers:
                    modes = [("full", args.full_iterations)] if name == "TV" else \
                        [("full", args.full_iterations), ("incremental", args.incremental_iterations)]
                    for mode, iterations in modes:
                        tuned = settings[_key(family, name, mode, level)]
                        row[f"{mode}/{name}"] = _reconstruct(op, denoiser, ys, image, tuned["gamma"],
                                                             tuned["sigma"] / 255, mode, iterations, args.seed)
                rows.append(row)
                print(json.dumps(row), flush=True)
                _write(out, f"table-{args.images.replace(',', '-')}{'-' + args.problems if args.problems else ''}"
                            f"{'' if args.noise is None else f'-{args.noise:g}'}", rows)


def part_minibatch(args, out: Path) -> None:
    """Incremental PnP-ADMM with mini-batches of 1, 2, 4, 8 blocks against the full method (camera)."""
    settings = _tuned(out)
    name, denoiser = _denoisers(args, out)[1]
    image = load_test_image("camera", args.size)
    rows = []
    for label, family, kwargs, blocks in (PROBLEMS[1], PROBLEMS[4]):
        op = _operator(family, image.shape, kwargs, blocks, args.seed)
        ys = measure(op, image, NOISE_LEVELS[0], args.seed)
        for per_step in (1, 2, 4, 8, blocks):
            mode = "full" if per_step == blocks else "incremental"
            tuned = settings[_key(family, name, mode, NOISE_LEVELS[0])]
            iterations = args.full_iterations if mode == "full" else args.incremental_iterations
            result = _reconstruct(op, denoiser, ys, image, tuned["gamma"], tuned["sigma"] / 255, mode, iterations,
                                  args.seed, blocks_per_step=per_step)
            rows.append({"problem": label, "blocks": blocks, "blocks_per_step": per_step, "iterations": iterations,
                         "denoiser": name, **result})
            print(json.dumps(rows[-1]), flush=True)
            _write(out, "minibatch", rows)


def _peak_rss_mib() -> float:
    """The process's resident-memory high-water mark (``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the lifetime peak


def _reset_peak_rss() -> None:
    """Free what the set-up left behind and restart the high-water mark, so the peak is the iterations'."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


def scaling_worker(spec: str) -> None:
    """One scaling run in this process: ``MODE,CACHE,BLOCKS,ANGLES_PER_BLOCK,ITERATIONS,SIZE,DENOISER,GAMMA,SIGMA``."""
    mode, cache, blocks, per_block, iterations, size, denoiser_file, gamma, sigma = spec.split(",")
    blocks, per_block, iterations, size = int(blocks), int(per_block), int(iterations), int(size)
    image = load_test_image("camera", size)
    op = ParallelBeamCT((size, size), blocks * per_block, blocks, cache_grids=cache == "cached")
    ys = measure(op, image, NOISE_LEVELS[0], 0)
    denoiser = TVDenoiser(1.0) if denoiser_file == "tv" else load_denoiser(denoiser_file)[0]
    pnp = PnPADMM(op, denoiser, ys, gamma=float(gamma), sigma=float(sigma) / 255, mode=mode, reference=image)
    _reset_peak_rss()  # the set-up (simulating every measurement, the back-projection) is not an iteration's
    before = _peak_rss_mib()
    records = pnp.run(iterations)
    grids = sum(g.numel() * g.element_size() for g in op._grids.values())
    print(json.dumps({"mode": mode, "grids": cache, "blocks": blocks, "angles": blocks * per_block,
                      "seconds_per_iteration": sorted(r.seconds for r in records[1:])[(len(records) - 1) // 2],
                      "peak_rss_mib": _peak_rss_mib(), "rss_growth_mib": _peak_rss_mib() - before,
                      "cached_grids_mib": grids / 2 ** 20,
                      "measurements_kib": sum(y.numel() * y.element_size() for y in ys) / 1024,
                      "psnr": records[-1].psnr, "iterations": pnp.iteration}))


#: the scaling part's runs: the full method with the sampling grids of every angle kept (fast) and
#: rebuilt per call (the memory of one block at a time), the incremental one with them rebuilt
SCALING_RUNS = (("full", "cached"), ("full", "rebuilt"), ("incremental", "rebuilt"))


def part_scaling(args, out: Path) -> None:
    settings = _tuned(out)
    network = out / "dncnn-backprop.pt"
    denoiser, prior = (str(network), "DnCNN (backprop)") if network.is_file() else ("tv", "TV")
    fallback = {"gamma": 2.0, "sigma": 10} if network.is_file() else {"gamma": 8.0, "sigma": 80}
    rows = []
    for blocks in (int(b) for b in args.block_counts.split(",")):
        for mode, cache in SCALING_RUNS:
            # equal passes over the measurements: one incremental iteration uses one block
            iterations = args.scaling_iterations * (blocks if mode == "incremental" else 1)
            tuned = settings.get(_key("ct", prior, mode if prior != "TV" else "full", NOISE_LEVELS[0]), fallback)
            spec = ",".join(str(v) for v in (mode, cache, blocks, args.angles_per_block, iterations, args.size,
                                             denoiser, tuned["gamma"], tuned["sigma"]))
            proc = subprocess.run([sys.executable, __file__, "--worker", spec, "--threads", str(args.threads)],
                                  capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write(out, "scaling", rows)
    plot_scaling(rows, out / "scaling.png")


def plot_scaling(rows: list[dict], path: Path) -> None:
    """Seconds per iteration and peak memory against the number of blocks, full and incremental."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for (mode, cache), marker in zip(SCALING_RUNS, "o^s"):
        mine = [r for r in rows if r["mode"] == mode and r["grids"] == cache]
        blocks = [r["blocks"] for r in mine]
        label = f"{mode} (grids {cache})"
        axes[0].loglog(blocks, [r["seconds_per_iteration"] for r in mine], marker=marker, label=label, base=2)
        axes[1].semilogx(blocks, [r["peak_rss_mib"] for r in mine], marker=marker, label=label, base=2)
    axes[0].set_ylabel("seconds per iteration (median)")
    axes[1].set_ylabel("peak resident memory while iterating (MiB)")
    for ax in axes:
        ax.set_xlabel(f"measurement blocks ({rows[0]['angles'] // rows[0]['blocks']} angles each)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Sparse-view CT: PnP-ADMM against incremental PnP-ADMM as the measurements grow", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        scaling_worker(args.worker)
        return
    out = Path(args.out)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); command: python scripts/bench_reconstruct.py "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}", flush=True)
    for part in PARTS:
        if part in args.part:
            globals()[f"part_{part}"](args, out)


if __name__ == "__main__":
    main()
