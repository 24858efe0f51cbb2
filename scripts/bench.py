#!/usr/bin/env python
"""Speed benchmarks, measured side by side in one run and reported as ratios.

1. Time per step of every registered learner (with its defaults, plus ``--also`` variants) against
   backprop-Adam on the same network, batch, data and device. The learners run in interleaved rounds (AM, backprop, AM, backprop, ...) so both see
   the same machine conditions; the reported ratio is the median of the per-round ratios. Each
   step's matrix multiply-adds (torch's flop counter) at the header's GEMM speed give the least
   ratio the learner could reach were everything but its GEMMs free.
2. AM-mem's weight solve: one Gauss-Seidel sweep as blocked triangular solves (and the full Cholesky solve)
   against the reference code's column-by-column sweep, on co-activation memories of real MNIST
   inputs at width 784 (+1 bias column); then AM-mem's step, the time inside its GEMM and
   triangular-solve kernels alone (CPU profiler), its first layer's parts and a backprop-Adam step.
3. Avalanche: an epoch of AM-Adam through ``AMStrategy`` against its plain loop, and the
   online-replay Split-MNIST protocol of Avalanche's continual-learning-baselines through
   ``AMStrategy`` with a ``Backprop`` learner against Avalanche's own ``OnlineNaive``.
4. (``--section compiled``) every learner with ``compile=True`` against itself eagerly.
5. (``--section stream``) Elec2 one sample at a time through amstream's learners and river's
   deep-river, each in its own worker process (deep-river in its own environment: ``--make-envs``),
   as samples per second and ratios to deep-river's (``scripts/_bench_stream.py``).
6. (``--section rl``) DQN on CartPole-v1: ``agents.DQNAgent`` against Stable-Baselines3's DQN
   (``scripts/_bench_rl.py``).
7. (``--section distributed``) samples per second on 1, 2, ... data-parallel processes (gloo) and
   the bytes communicated per step (``scripts/_bench_distributed.py``).

Real MNIST batches are used (``AMSTREAM_DATA`` / ``--data-dir``). Results are printed as a Markdown
table ready for BENCHMARKS.md, with the device and the command line.

    python scripts/bench.py                      # CPU (or CUDA when present)
    python scripts/bench.py --device cuda --rounds 30
    python scripts/bench.py --threads 1 --section stream --make-envs
    python scripts/bench.py --threads 1 --section compiled --learner am-adam,am-mem
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from amstream import LEARNERS, AMAdam, Backprop, UnsupportedModelError  # noqa: E402
from amstream.data import load_mnist  # noqa: E402
from amstream.memory import (  # noqa: E402
    gauss_seidel_sweep, gauss_seidel_sweep_, gauss_seidel_sweep_reference, memory_solve, symmetric_update_,
    update_memory_,
)
from amstream.utils import resolve_device  # noqa: E402

from _bench_distributed import distributed_throughput  # noqa: E402
from _bench_rl import dqn_throughput  # noqa: E402
from _bench_stream import stream_throughput  # noqa: E402
from _common import (  # noqa: E402
    CommaList, Parser, add_option, avalanche_warnings, build_mlp, learner_names, parse_int_list, parse_name_list,
    parse_run,
)
from amstream.hparams import HParam  # noqa: E402


SECTIONS = ("steps", "solve", "strategy", "online-replay", "compiled", "stream", "rl", "distributed")
DEFAULT_SECTIONS = ("steps", "solve", "strategy", "online-replay")


def parse_args(argv=None) -> argparse.Namespace:
    count = "[1, inf)"
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="torch device (auto: CUDA when available)")
    add_option(p, "--threads", HParam(None, "torch CPU threads (default: torch's own)", int, count, optional=True))
    p.add_argument("--data-dir", default=None, help="root of the MNIST files (default: AMSTREAM_DATA)")
    p.add_argument("--hidden", default="100,100", help="hidden widths of the 784-...-10 ReLU MLP")
    p.add_argument("--batchnorm", action="store_true",
                   help="steps and compiled sections: BatchNorm1d after each hidden Linear (section 1's network; "
                        "learners that do not take it are left out)")
    p.add_argument("--learner", action=CommaList, default=",".join(learner_names()),
                   help="registered learners timed against backprop-Adam, each with its defaults")
    p.add_argument("--also", action="append", default=None, metavar="LEARNER:NAME=VALUE[,NAME=VALUE]",
                   help="also time a learner with other hyperparameters, e.g. am-adam:fast=false (repeatable; "
                        "default: am-adam:fast=false, the autograd path that Conv and BatchNorm models take; "
                        "none: no other variant)")
    add_option(p, "--batch-size", HParam(200, "samples per step", int, count))
    add_option(p, "--rounds", HParam(20, "interleaved timing rounds per learner pair", int, count))
    add_option(p, "--steps", HParam(10, "steps per learner per round", int, count))
    add_option(p, "--warmup", HParam(10, "untimed steps per learner before timing", int, "[0, inf)"))
    add_option(p, "--solve-rounds", HParam(7, "interleaved timing rounds of the solvers", int, count))
    add_option(p, "--solve-repeats", HParam(3, "repeats per solver and round (the best counts)", int, count))
    p.add_argument("--skip-solve", action="store_true", help="skip the AM-mem solver benchmark")
    p.add_argument("--skip-strategy", action="store_true",
                   help="skip the Avalanche AMStrategy overhead benchmark (it imports avalanche: ~8 s)")
    add_option(p, "--strategy-rounds", HParam(5, "interleaved epochs per side", int, count))
    add_option(p, "--strategy-samples", HParam(6000, "training samples of the Split-MNIST experience used for the "
                                               "overhead epochs", int, count))
    p.add_argument("--skip-online-replay", action="store_true",
                   help="skip the online-replay protocol, AMStrategy (backprop) against Avalanche's OnlineNaive")
    add_option(p, "--online-replay-rounds", HParam(3, "interleaved runs of the online-replay protocol per side", int,
                                                   count))
    add_option(p, "--online-replay-subset", HParam(None, "online replay: keep the first N MNIST training samples "
                                                   "(default: all 60,000)", int, count, optional=True))
    p.add_argument("--section", action="append", choices=SECTIONS, default=None,
                   help="run only these sections (repeatable); default: " + ", ".join(DEFAULT_SECTIONS) +
                        ". compiled: every learner with compile=True against itself eagerly (compiles first: "
                        "tens of seconds each on a CPU); stream: Elec2 one sample at a time against deep-river")
    add_option(p, "--stream-samples", HParam(45312, "stream section: Elec2 samples (45,312: all)", int, count))
    p.add_argument("--stream-learner", default="backprop,am-adam,am-mem",
                   help="stream section: learners, each run one sample at a time and with a micro-batch of 16")
    add_option(p, "--rl-steps", HParam(100_000, "rl section: environment steps per DQN run", int, count))
    add_option(p, "--rl-rounds", HParam(2, "rl section: rounds of one run per agent", int, count))
    p.add_argument("--rl-learner", default="backprop,am-adam", help="rl section: the DQNAgent learners")
    p.add_argument("--rl-compiled", action="store_true",
                   help="rl section: also run each agent with compile=True (after one untimed run that compiles "
                        "its update or loads it from torch's compiler cache)")
    p.add_argument("--processes", default="1,2", help="distributed section: numbers of processes (gloo, one "
                   "thread each; 1 is always run first, as the base of the speed-ups)")
    add_option(p, "--distributed-steps", HParam(50, "distributed section: timed steps per run", int, count))
    p.add_argument("--distributed-learner", default="backprop,am-adam,am-mem",
                   help="distributed section: the learners (each data-parallel over the processes)")
    p.add_argument("--distributed-also", action="append", default=[], metavar="LEARNER:NAME=VALUE[,NAME=VALUE]",
                   help="distributed section: also a learner with other hyperparameters, e.g. "
                        "am-mem:parallel_memory=gather (repeatable)")
    p.add_argument("--distributed-overlap", action="store_true",
                   help="distributed section: also run each learner with overlap=True (each layer's gradient "
                        "all-reduce started as soon as it is ready)")
    p.add_argument("--make-envs", action="store_true",
                   help="make the other libraries' environments when missing: deep-river's own virtual "
                        "environment (.bench-envs/deep-river, pip install deep-river==0.3.4 and its torch 2.5: "
                        "several GB, once) and Stable-Baselines3 alone (.bench-envs/sb3-overlay)")
    args = p.parse_args(argv)
    try:
        parse_int_list(args.hidden)
        args.learners = parse_name_list(args.learner, learner_names(), "learner")
        args.stream_learners = parse_name_list(args.stream_learner, learner_names(), "learner")
        args.rl_learners = parse_name_list(args.rl_learner, learner_names(), "learner")
        args.distributed_learners = [(name, {}) for name in parse_name_list(args.distributed_learner, learner_names(),
                                                                             "learner")]
        args.distributed_learners += [_variant(text) for text in args.distributed_also]
        args.process_counts = sorted({1, *parse_int_list(args.processes)})
        also = args.also if args.also is not None else ["am-adam:fast=false"]
        args.also = [] if also == ["none"] else [_variant(text) for text in also]
    except ValueError as err:
        p.error(str(err))
    return args


def _variant(text: str) -> tuple[str, dict]:
    """``"am-adam:fast=false,code_steps=3"`` -> ``("am-adam", {"fast": False, "code_steps": 3})``,
    each value parsed and checked by the learner's declaration."""
    return parse_run(text)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def step_times(args, device, x, y) -> list[dict]:
    """Interleaved rounds: per-step milliseconds of each learner and its ratio to backprop."""
    hidden = parse_int_list(args.hidden)

    def fresh(name, **kw):
        torch.manual_seed(0)
        return LEARNERS[name](build_mlp((1, 28, 28), hidden, 10, args.batchnorm), device=device, **kw)

    # the reference, then every chosen registered learner with its defaults, then the --also variants
    learners = {"backprop-adam": fresh("backprop", lr=0.003)}
    for name in args.learners:
        if name != "backprop":
            try:
                learners[name] = fresh(name)
            except UnsupportedModelError as err:  # a learner of sequence models: scripts/sequence.py times it
                print(f"note: {name} is not timed on the MLP ({' '.join(str(err).split())}); "
                      "scripts/sequence.py reports its time per step against backprop through time")
    for name, kwargs in args.also:
        learners[f"{name} ({', '.join(f'{k}={v}' for k, v in kwargs.items())})"] = fresh(name, **kwargs)
    batches = _batches(x, y, args.batch_size)
    per_round = _interleaved(learners, batches, args, device)
    rows = _ratio_rows(per_round, "backprop-adam", "learner")
    for row in rows:
        row["macs"] = matrix_macs(learners[row["learner"]], *batches[0])
    return rows


def matrix_macs(learner, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Multiply-adds of one step's matrix products (torch's flop counter: GEMMs and convolutions, not
    triangular solves). Divided by the GEMM speed, the least time the step can take on this machine.
    None where the counter cannot follow the step (it refuses ``torch.autograd.grad`` on a non-leaf)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            learner.learn(x, y)
    except RuntimeError:
        return None
    return counter.get_total_flops() / 2


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(x.shape[0] // size)]


def _interleaved(learners: dict, batches: list, args, device) -> dict:
    """Milliseconds per step of each learner in each of ``args.rounds`` rounds, the learners taking
    ``args.steps`` steps in turn (after ``args.warmup`` untimed ones), so all see the same machine."""
    cursor = {name: 0 for name in learners}

    def run(name: str, n: int) -> None:
        learner = learners[name]
        for _ in range(n):
            bx, by = batches[cursor[name] % len(batches)]
            learner.learn(bx, by)
            cursor[name] += 1

    for name in learners:
        run(name, args.warmup)
    per_round: dict[str, list[float]] = {name: [] for name in learners}
    for _ in range(args.rounds):
        for name in learners:
            per_round[name].append(_timed(lambda: run(name, args.steps), device) / args.steps * 1e3)
    return per_round


def _ratio_rows(per_round: dict[str, list[float]], base_name: str, key: str) -> list[dict]:
    """Median milliseconds and the median (with quartiles) of the per-round ratios to ``base_name``."""
    base = per_round[base_name]
    rows = []
    for name, times in per_round.items():
        ratios = [t / b for t, b in zip(times, base)]
        rows.append({key: name, "ms_per_step": statistics.median(times),
                     "ratio": statistics.median(ratios), "ratio_q1": _quantile(ratios, 0.25),
                     "ratio_q3": _quantile(ratios, 0.75)})
    return rows


def compiled_times(args, device, x, y) -> list[dict]:
    """Every learner with ``compile=True`` and eagerly, all interleaved in one run: the first two
    steps' seconds (compilation), the compiled step's ratio to the same learner's eager step, and
    to backprop-Adam's eager and compiled steps (per round, so that all see the same machine)."""
    hidden = parse_int_list(args.hidden)
    batches = _batches(x, y, args.batch_size)
    learners, first = {}, {}
    for name in ["backprop", *[n for n in args.learners if n != "backprop"]]:
        kwargs = {"lr": 0.003} if name == "backprop" else {}
        try:
            for mode in (False, True):
                torch.manual_seed(0)
                learners[name, mode] = LEARNERS[name](build_mlp((1, 28, 28), hidden, 10, args.batchnorm),
                                                      device=device, compile=mode, **kwargs)
        except UnsupportedModelError:
            continue
        start = time.perf_counter()  # a learner may compile at its first two steps (AM-Adam's whole
        for bx, by in batches[:2]:   # step waits for Adam's state, which torch makes at the first)
            learners[name, True].learn(bx, by)
        first[name] = time.perf_counter() - start
    per_round = _interleaved(learners, batches, args, device)

    def ratios(a, b) -> list[float]:
        return sorted(t / u for t, u in zip(per_round[a], per_round[b]))

    rows = []
    for name in first:
        own = ratios((name, True), (name, False))
        functions = learners[name, True]._compiled_functions
        rows.append({"learner": name, "eager_ms": statistics.median(per_round[name, False]),
                     "compiled_ms": statistics.median(per_round[name, True]), "ratio": statistics.median(own),
                     "q1": _quantile(own, 0.25), "q3": _quantile(own, 0.75), "first_step_s": first[name],
                     "to_backprop_eager": statistics.median(ratios((name, True), ("backprop", False))),
                     "to_backprop_compiled": statistics.median(ratios((name, True), ("backprop", True))),
                     "compiled": ", ".join(k for k, f in functions.items() if f.active) or "none",
                     "eager_fallback": ", ".join(k for k, f in functions.items() if not f.active)})
    return rows


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def solver_times(args, device, x) -> list[dict]:
    """Memories of a Linear(784, 100) layer over 20 real MNIST batches, then each solver timed."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(784, 100).to(device)
    d = 785
    A = torch.zeros(d, d, device=device)
    Bm = torch.zeros(100, d, device=device)
    for i in range(20):
        a = x[i * 200:(i + 1) * 200].flatten(1)
        a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        with torch.no_grad():
            c = torch.relu(a @ torch.cat([layer.weight, layer.bias[:, None]], 1).T) + 0.1 * torch.randn(200, 100, device=device)
        update_memory_(A, Bm, a, c, mode="sum", count=0)
    W = torch.cat([layer.weight, layer.bias[:, None]], 1).detach()

    W_work = W.clone()
    solvers = {  # the fast sweep as AM-mem runs it: in place
        "column-by-column sweep (reference loop)": lambda: gauss_seidel_sweep_reference(W, A, Bm),
        "sweep as blocked triangular solves": lambda: gauss_seidel_sweep_(W_work.copy_(W), A, Bm),
        "full Cholesky solve": lambda: memory_solve(A, Bm),
    }
    reference = gauss_seidel_sweep_reference(W, A, Bm)
    fast = gauss_seidel_sweep(W, A, Bm)  # the same blocked sweep, on a copy
    max_diff = float((reference - fast).abs().max() / reference.abs().max())
    for fn in solvers.values():  # warm-up (cuSOLVER/cuBLAS handles, allocator)
        fn()
    # Interleaved rounds, like the step benchmark: every round times each solver (best of a few
    # repeats), and the speed-ups are medians of the per-round ratios to the loop.
    per_round: dict[str, list[float]] = {name: [] for name in solvers}
    for _ in range(args.solve_rounds):
        for name, fn in solvers.items():
            per_round[name].append(min(_timed(fn, device) for _ in range(args.solve_repeats)) * 1e3)
    loop = per_round["column-by-column sweep (reference loop)"]
    rows = []
    for name, times in per_round.items():
        ratios = [lp / t for lp, t in zip(loop, times)]
        rows.append({"solver": name, "ms": statistics.median(times), "speedup": statistics.median(ratios),
                     "q1": _quantile(ratios, 0.25), "q3": _quantile(ratios, 0.75)})
    rows.append({"solver": "max |blocked - loop| / max |W|", "ms": float("nan"), "speedup": max_diff})
    return rows


def ammem_parts(args, device, x, y) -> list[dict]:
    """A whole AM-mem step (784-100-100-10, batch ``--batch-size``) and its first layer's parts, in
    interleaved rounds (best of ``--solve-repeats`` each): the memory update as one GEMM and as
    symmetric row panels, the warm-started sweep, and the full Cholesky solve of the same memories
    (the cost of solving the layer exactly, which the sweep replaces)."""
    torch.manual_seed(0)
    learner = LEARNERS["am-mem"](build_mlp((1, 28, 28), parse_int_list(args.hidden), 10), device=device)
    batches = _batches(x, y, args.batch_size)
    for bx, by in batches:
        learner.learn(bx, by)
    A, Bm = (t.clone() for t in learner._memories[0])
    a = torch.cat([batches[0][0].flatten(1), torch.ones_like(batches[0][0].flatten(1)[:, :1])], dim=1).to(A.dtype)
    layer = learner.blocks.hidden[0].weight_layer
    W = torch.cat([layer.weight, layer.bias[:, None]], 1).detach().to(A.dtype)
    W_work, A_work = W.clone(), A.clone()
    cursor = [0]

    def step():
        learner.learn(*batches[cursor[0] % len(batches)])
        cursor[0] += 1

    parts = {
        "AM-mem step, whole": step,
        "first layer: memory update, one GEMM": lambda: A_work.copy_(A).addmm_(a.T, a, beta=0.7, alpha=0.3),
        "first layer: memory update, symmetric panels": lambda: symmetric_update_(A_work.copy_(A), a, beta=0.7,
                                                                                  alpha=0.3),
        "first layer: the sweep (AM-mem's solve)": lambda: gauss_seidel_sweep_(W_work.copy_(W), A, Bm, 1e-10, shift=0.5),
        "first layer: full Cholesky solve (exact)": lambda: memory_solve(A, Bm),
        "copy of the memory alone (in every row above but the step)": lambda: A_work.copy_(A),
    }
    torch.manual_seed(0)
    backprop = LEARNERS["backprop"](build_mlp((1, 28, 28), parse_int_list(args.hidden), 10), device=device, lr=0.003)
    for bx, by in batches[:10]:
        backprop.learn(bx, by)
    parts["backprop-Adam step, whole (for scale)"] = lambda: backprop.learn(*batches[cursor[0] % len(batches)])
    per_round: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(args.solve_rounds):
        for name, fn in parts.items():
            per_round[name].append(min(_timed(fn, device) for _ in range(args.solve_repeats)) * 1e3)
    rows = [{"part": name, "ms": statistics.median(times)} for name, times in per_round.items()]
    if device.type == "cpu":
        rows.insert(1, {"part": "AM-mem step: its matrix products and triangular solves alone (profiler, 10 steps)",
                        "ms": _kernel_ms(step, ("aten::addmm", "aten::mm", "aten::linalg_solve_triangular"), 10)})
    return rows


def _kernel_ms(fn, kernels: tuple[str, ...], calls: int) -> float:
    """Milliseconds per call of ``fn`` spent in the named operators themselves (CPU profiler, self time):
    what a step costs at least however little everything around them costs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in kernels) / calls / 1e3


def strategy_overhead(args, device) -> list[dict]:
    """One epoch through Avalanche against the same learner's plain loop over the same data (the
    first Split-MNIST experience, batch ``--batch-size``), in interleaved rounds: AM-Adam through
    ``AMStrategy``, and for scale, Avalanche's own ``Naive`` strategy against a raw torch loop
    (backprop-Adam; Avalanche's default loader, which pins memory on CUDA)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from avalanche.training import Naive
        from avalanche.training.plugins import EvaluationPlugin
        from scenarios.benchmarks import split_mnist
        from scenarios.strategy import AMStrategy

        benchmark = split_mnist(5, seed=0, root=args.data_dir, subset=5 * args.strategy_samples)
    experience = benchmark.train_stream[0]
    hidden = parse_int_list(args.hidden)

    def model():
        torch.manual_seed(0)
        return build_mlp((1, 28, 28), hidden, 10)

    plain_am = AMAdam(model(), device=device)
    raw_model = model().to(device)
    raw_optimizer = torch.optim.Adam(raw_model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No loggers specified"
        am_strategy = AMStrategy(learner=AMAdam(model(), device=device), train_mb_size=args.batch_size,
                                 eval_mb_size=1000, evaluator=EvaluationPlugin(loggers=[]), device=device)
        bp_model = model().to(device)
        naive = Naive(model=bp_model, optimizer=torch.optim.Adam(bp_model.parameters(), lr=1e-3),
                      criterion=torch.nn.CrossEntropyLoss(), train_mb_size=args.batch_size, eval_mb_size=1000,
                      evaluator=EvaluationPlugin(loggers=[]), device=device)
    loader = torch.utils.data.DataLoader(experience.dataset, batch_size=args.batch_size, shuffle=True)

    def plain_epoch(learner):
        for x, y, _ in loader:
            learner.learn(x.to(device), y.to(device))

    def raw_torch_epoch():  # the textbook loop, without amstream's input checks and rollback guard
        for x, y, _ in loader:
            raw_optimizer.zero_grad()
            torch.nn.functional.cross_entropy(raw_model(x.to(device)), y.to(device)).backward()
            raw_optimizer.step()

    sides = {
        "am-plain": lambda: plain_epoch(plain_am),
        "am-strategy": lambda: am_strategy.train(experience),
        "bp-plain": raw_torch_epoch,
        "bp-naive": lambda: naive.train(experience),
    }
    for run in sides.values():  # warm-up
        run()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.strategy_rounds):
        for key, run in sides.items():
            times[key].append(_timed(run, device))
    n = len(experience.dataset)

    def row(what, key, base):
        ratios = [t / b for t, b in zip(times[key], times[base])]
        out = {"what": what, "s": statistics.median(times[key]), "ratio": statistics.median(ratios)}
        if key != base:
            out.update(q1=_quantile(ratios, 0.25), q3=_quantile(ratios, 0.75))
        return out

    return [row(f"AM-Adam, plain loop: learner.learn over {n} samples", "am-plain", "am-plain"),
            row("AM-Adam, AMStrategy.train (all callbacks, default evaluator off)", "am-strategy", "am-plain"),
            row("backprop-Adam, raw torch loop", "bp-plain", "bp-plain"),
            row("backprop-Adam, Avalanche's Naive.train (for scale)", "bp-naive", "bp-plain")]


def online_replay_overhead(args, device) -> list[dict]:
    """The online-replay Split-MNIST protocol of Avalanche's continual-learning-baselines
    (``experiments/split_mnist/online_replay.py``): SimpleMLP (784-512-10, dropout 0.5), SGD at
    0.1, sub-experiences and mini-batches of 10, class-balanced replay of 1,000 (adaptive), an
    evaluation on the experiences seen after each one. Avalanche's ``OnlineNaive`` against
    ``AMStrategy`` with a ``Backprop`` learner on the same model, seeds and data, in interleaved
    rounds; the two must also end with the same accuracy (they train identically)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from avalanche.evaluation.metrics import accuracy_metrics
        from avalanche.models import SimpleMLP
        from avalanche.training import OnlineNaive
        from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
        from avalanche.training.storage_policy import ClassBalancedBuffer
        from scenarios.benchmarks import online, split_mnist
        from scenarios.strategy import AMStrategy

        benchmark = split_mnist(5, class_order=list(range(10)), root=args.data_dir, subset=args.online_replay_subset)

    def run(side: str) -> tuple[float, float]:
        with avalanche_warnings(quiet=True):
            torch.manual_seed(0)
            model = SimpleMLP(num_classes=10)
            common = {"train_mb_size": 10, "eval_mb_size": 64, "device": device,
                      "plugins": [ReplayPlugin(1000, storage_policy=ClassBalancedBuffer(1000, adaptive_size=True))],
                      "evaluator": EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])}
            if side == "online-naive":
                strategy = OnlineNaive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **common)
            else:
                strategy = AMStrategy(learner=Backprop(model, optimizer="sgd", lr=0.1, device=device), **common)
            start = time.perf_counter()
            for t, experience in enumerate(benchmark.train_stream):
                strategy.train(online(experience, 10, seed=0), eval_streams=[], num_workers=0, drop_last=True)
                strategy.eval(benchmark.test_stream[: t + 1])
            _sync(device)
            seconds = time.perf_counter() - start
            accuracy = strategy.evaluator.get_last_metrics()["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
        return seconds, accuracy

    results: dict[str, list[tuple[float, float]]] = {"online-naive": [], "am-strategy": []}
    for _ in range(args.online_replay_rounds):
        for side in results:
            results[side].append(run(side))
    ratios = [a[0] / b[0] for a, b in zip(results["am-strategy"], results["online-naive"])]
    n = sum(len(e.dataset) for e in benchmark.train_stream)
    return [
        {"what": f"Avalanche OnlineNaive ({n} training samples)", "s": statistics.median(t for t, _ in results["online-naive"]),
         "ratio": 1.0, "accuracy": results["online-naive"][-1][1]},
        {"what": "AMStrategy with a Backprop learner", "s": statistics.median(t for t, _ in results["am-strategy"]),
         "ratio": statistics.median(ratios), "q1": _quantile(ratios, 0.25), "q3": _quantile(ratios, 0.75),
         "accuracy": results["am-strategy"][-1][1]},
    ]


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {cpu_model()}, {torch.get_num_threads()} torch threads"


def cpu_model() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what :mod:`platform` knows. The
    ratios of GEMM-bound steps to overhead-bound ones depend on it: one thread's float32 GEMM ran
    at about 80 GMAC/s on one of our 2-vCPU machines and 43 on another (BENCHMARKS.md, section 12)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gemm_speed(device: torch.device, seconds: float = 0.2) -> float:
    """Multiply-adds per nanosecond of a square float32 GEMM at this run's thread count: the machine's
    scale for the GEMM-bound parts of a step (a step's ratio to backprop moves with it). A GPU gets
    a larger product and one sync per 10 calls, so that launch latency does not stand for speed."""
    size = 4096 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device)
    out = torch.empty_like(a)
    torch.mm(a, a, out=out)
    _sync(device)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            torch.mm(a, a, out=out)
        calls += 10
        _sync(device)
    return calls * size ** 3 / (time.perf_counter() - start) / 1e9


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        train = load_mnist("train", root=args.data_dir)
    except (ValueError, FileNotFoundError) as err:
        print(f"bench.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    n = max(4000, args.batch_size * 20)
    x, y = train.x[:n].to(device), train.y[:n].to(device)

    gmacs = gemm_speed(device)
    print(f"device: {describe_device(device)}; torch {torch.__version__}; float32 GEMM {gmacs:.0f} GMAC/s")
    print(f"command: python scripts/bench.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print()
    sections = set(args.section or DEFAULT_SECTIONS)
    net = (f"MNIST 784-{args.hidden.replace(',', '-')}-10 ReLU MLP{' with BatchNorm' if args.batchnorm else ''}, "
           f"batch {args.batch_size}")
    if "steps" in sections:
        rows = step_times(args, device, x, y)
        base = next(row for row in rows if row["learner"] == "backprop-adam")
        _table(f"Step time, {net}, {args.rounds} interleaved rounds x {args.steps} steps (median; ratio IQR in "
               f"brackets); a step's matrix multiply-adds at this machine's GEMM speed ({gmacs:.0f} GMAC/s) are "
               "the least time it can take, and that floor over backprop-Adam's measured step the least ratio",
               ["learner", "ms/step", "ratio to backprop-Adam", "matrix multiply-adds", "their time at the GEMM speed",
                "least ratio"],
               [[row["learner"], f"{row['ms_per_step']:.2f}",
                 f"{row['ratio']:.2f}x [{row['ratio_q1']:.2f}, {row['ratio_q3']:.2f}]",
                 *(["", "", ""] if row["macs"] is None else
                   [f"{row['macs'] / 1e6:.1f}M", f"{row['macs'] / gmacs / 1e6:.2f} ms",
                    f"{row['macs'] / gmacs / 1e6 / base['ms_per_step']:.2f}x"])]
                for row in rows])
    if "compiled" in sections:
        _table(f"Compiled (compile=True) against eager steps, {net}, {args.rounds} interleaved rounds x "
               f"{args.steps} steps each (median; ratio IQR in brackets)",
               ["learner", "eager ms", "compiled ms", "compiled / eager", "compiled / backprop eager",
                "compiled / backprop compiled", "first 2 steps (s)", "compiled functions"],
               [[row["learner"], f"{row['eager_ms']:.2f}", f"{row['compiled_ms']:.2f}",
                 f"{row['ratio']:.2f}x [{row['q1']:.2f}, {row['q3']:.2f}]", f"{row['to_backprop_eager']:.2f}x",
                 f"{row['to_backprop_compiled']:.2f}x", f"{row['first_step_s']:.1f}",
                 row["compiled"] + (f" (eager: {row['eager_fallback']})" if row["eager_fallback"] else "")]
                for row in compiled_times(args, device, x, y)])
    if "stream" in sections:
        runs = [(f"{name}{'' if mb == 1 else f', micro-batch {mb}'}", name, {"lr": 1e-3} if name == "backprop" else {},
                 mb) for mb in (1, 16) for name in args.stream_learners]
        rows = stream_throughput(runs, samples=args.stream_samples, chunk=500, make_envs=args.make_envs,
                                 data_dir=args.data_dir)
        _table(f"Streaming: Elec2 in time order ({min(args.stream_samples, 45312):,} samples), dict features, "
               "test-then-train one sample at a time (predict_one, learn_one), 8-32-2 ReLU MLP, one thread "
               "per worker, workers taking 500 samples in turn",
               ["runner", "samples/s", "ratio to deep-river", "prequential accuracy"],
               [[row["runner"], f"{row['samples_per_s']:,.0f}",
                 "" if row["ratio"] is None else f"{row['ratio']:.2f}x", f"{row['accuracy']:.4f}"] for row in rows])
    if "rl" in sections:
        rows = dqn_throughput(args.rl_learners, steps=args.rl_steps, rounds=args.rl_rounds, make_envs=args.make_envs,
                              compiled=args.rl_compiled)
        _table(f"DQN on CartPole-v1, {args.rl_steps:,} steps, BENCHMARKS.md section 7 settings without evaluation, "
               f"one thread, {args.rl_rounds} rounds of one fresh run each in turn (median; ratio range in brackets)",
               ["agent", "environment steps/s", "ratio to Stable-Baselines3"],
               [[row["runner"], f"{row['steps_per_s']:,.0f}",
                 "" if row["ratio"] is None else f"{row['ratio']:.2f}x [{row['spread'][0]:.2f}, {row['spread'][1]:.2f}]"]
                for row in rows])
    if "solve" in sections and not args.skip_solve:
        print()
        print("AM-mem weight solve, memories of 4,000 MNIST inputs, width 784 + bias, 100 outputs "
              f"({args.solve_rounds} interleaved rounds, best of {args.solve_repeats} each; median, IQR in brackets)")
        print()
        print("| solver | ms | speed-up over the loop |")
        print("|---|---:|---:|")
        for row in solver_times(args, device, x):
            if row["solver"].startswith("max"):
                print(f"| {row['solver']} | | {row['speedup']:.1e} |")
            else:
                print(f"| {row['solver']} | {row['ms']:.2f} | {row['speedup']:.1f}x [{row['q1']:.1f}, {row['q3']:.1f}] |")
    if "distributed" in sections:
        rows = distributed_throughput(args.distributed_learners, args.process_counts, batch=args.batch_size,
                                      steps=args.distributed_steps, warmup=args.warmup, hidden=args.hidden,
                                      data_dir=args.data_dir, overlap=args.distributed_overlap)
        _table(f"Data-parallel throughput, {net} split across the processes (gloo, one thread each), "
               f"{args.distributed_steps} timed steps", ["learner", "processes", "samples/s", "speed-up over 1",
                                                         "communicated per step (rank 0)"],
               [[row["learner"], str(row["processes"]), f"{row['samples_per_s']:,.0f}", f"{row['speedup']:.2f}x",
                 f"{row['bytes_per_step'] / 1024:,.1f} KiB" if row["processes"] > 1 else ""] for row in rows])
    if "solve" in sections and not args.skip_solve:
        _table(f"AM-mem's step and its first layer's parts (width 785 with the bias, {args.batch_size} samples), "
               f"{args.solve_rounds} interleaved rounds, best of {args.solve_repeats} each (median)",
               ["part", "ms"], [[row["part"], f"{row['ms']:.2f}"] for row in ammem_parts(args, device, x, y)])
    if "strategy" in sections and not args.skip_strategy:
        _table(f"Avalanche overhead: one epoch, first Split-MNIST experience, batch {args.batch_size}, "
               f"{args.strategy_rounds} interleaved rounds (median; ratio IQR in brackets)",
               ["epoch", "seconds", "ratio to the plain loop"],
               [[row["what"], f"{row['s']:.2f}", f"{row['ratio']:.2f}x{_spread(row)}"]
                for row in strategy_overhead(args, device)])
    if "online-replay" in sections and not args.skip_online_replay:
        _table("Online-replay Split-MNIST (continual-learning-baselines): the whole protocol, "
               f"{args.online_replay_rounds} interleaved runs per side (median; ratio IQR in brackets)",
               ["strategy", "seconds", "ratio to OnlineNaive", "final stream accuracy"],
               [[row["what"], f"{row['s']:.1f}", f"{row['ratio']:.2f}x{_spread(row)}", f"{row['accuracy']:.4f}"]
                for row in online_replay_overhead(args, device)])


def _spread(row: dict) -> str:
    return f" [{row['q1']:.2f}, {row['q3']:.2f}]" if "q1" in row else ""


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A Markdown table under its title; the first column left-aligned, the others right."""
    print()
    print(title)
    print()
    print("| " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (len(columns) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
