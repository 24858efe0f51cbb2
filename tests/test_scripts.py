"""Smoke tests of scripts/stream.py, run as a user would: a subprocess from the repository root."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import amstream

from learner_cases import conformance_cases

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "stream.py"
LEARNERS = ("am-adam", "am-mem", "backprop")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def table(stdout: str) -> dict[str, dict[str, float]]:
    """The final results table: learner -> prequential, held-out, best, seconds, rolled back. Its
    columns must line up: each row's prequential accuracy ends under the header's word."""
    rows, header_end = {}, None
    for line in stdout.splitlines():
        if line.startswith("learner ") and "prequential" in line:
            header_end = line.index("prequential") + len("prequential")
        m = re.match(r"^(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+) \((\d+)\)\s+([\d.]+)\s+(\S+)\s+(\d+)$", line)
        if m:
            assert m.end(2) == header_end, f"column out of line:\n{stdout}"
            rows[m[1]] = {"prequential": float(m[2]), "held_out": float(m[3]), "best": float(m[4]),
                          "best_epoch": int(m[5]), "seconds": float(m[6]), "rolled_back": int(m[8])}
    return rows


def test_default_run(tmp_path):
    proc = run("--max-samples", "200", "--logdir", str(tmp_path))
    rows = table(proc.stdout)
    # every registered learner by default; only those that train a recurrent network sit this MLP out
    skipped = dict(re.findall(r"^note: skipping (\S+): (.*)$", proc.stdout, flags=re.M))
    assert set(rows) == set(amstream.LEARNERS) - set(skipped), proc.stdout
    assert skipped and all("ElmanRNN" in reason for reason in skipped.values()), skipped
    for name, row in rows.items():
        assert 0.0 <= row["prequential"] <= 1.0 and 0.0 <= row["held_out"] <= 1.0, (name, row)
    assert rows["am-adam"]["held_out"] > 0.3  # 200 samples of 8x8 digits: far above chance (0.1)
    png = tmp_path / "stream-digits.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in rows:
        events = list(tmp_path.glob(f"digits-{name}-*/events.out.tfevents.*"))
        assert len(events) == 1 and events[0].stat().st_size > 0, name
    assert str(png) in proc.stdout and "TensorBoard" in proc.stdout


@pytest.mark.data
def test_mnist_real_data(tmp_path, data_root):
    proc = run("--dataset", "mnist", "--data-dir", str(data_root), "--max-samples", "400", "--epochs", "1",
               "--learner", "am-adam", "--logdir", str(tmp_path), "--quiet")
    rows = table(proc.stdout)
    assert set(rows) == {"am-adam"}
    assert rows["am-adam"]["held_out"] > 0.4, proc.stdout  # 400 MNIST samples, 10k held out
    assert (tmp_path / "stream-mnist.png").is_file()


@pytest.mark.slow
def test_checkpoint_resume_is_exact(tmp_path):
    common = ["--max-samples", "300", "--learner", "am-adam", "--checkpoint-every", "5", "--quiet",
              "--logdir", str(tmp_path / "runs")]
    straight = run(*common, "--checkpoint", str(tmp_path / "a" / "ck.pt"))

    stopped = run(*common, "--checkpoint", str(tmp_path / "b" / "ck.pt"), "--stop-after-steps", "13")
    assert "stopped after 13 steps" in stopped.stdout and not table(stopped.stdout)
    ckpt_b = tmp_path / "b" / "ck-am-adam.pt"
    assert torch.load(ckpt_b, weights_only=True)["extra"]["index"] == 130  # 13 batches of 10
    resumed = run(*common, "--checkpoint", str(tmp_path / "b" / "ck.pt"), "--resume")
    assert "resumed from" in resumed.stdout

    assert table(resumed.stdout)["am-adam"]["prequential"] == table(straight.stdout)["am-adam"]["prequential"]
    # the resumed run continued the interrupted run's TensorBoard folder, with no step logged twice
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = sorted((tmp_path / "runs").glob("digits-am-adam-*"))
    assert len(folders) == 2  # the straight run's and the interrupted-then-resumed run's
    resumed_dir = next(f for f in folders if str(f) in resumed.stdout)
    acc = EventAccumulator(str(resumed_dir), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("prequential/accuracy")]
    assert steps == sorted(set(steps)) and steps[0] < 130 < steps[-1], steps
    a = torch.load(tmp_path / "a" / "ck-am-adam.pt", weights_only=True)
    b = torch.load(ckpt_b, weights_only=True)
    assert a["extra"]["prequential"] == b["extra"]["prequential"]  # same counts and curve
    assert a["extra"]["test_curve"] == b["extra"]["test_curve"]
    for key, value in a["learner"]["model"].items():
        assert torch.equal(value, b["learner"]["model"][key]), key


def test_resume_with_a_mistyped_checkpoint_path_refuses_to_start_over(tmp_path):
    common = ["--max-samples", "100", "--learner", "backprop", "--quiet", "--logdir", str(tmp_path / "runs")]
    proc = run(*common, "--checkpoint", str(tmp_path / "typo.pt"), "--resume", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no checkpoint at" in proc.stderr and "typo-backprop.pt" in proc.stderr and "--allow-fresh" in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran
    fresh = run(*common, "--checkpoint", str(tmp_path / "typo.pt"), "--resume", "--allow-fresh")
    assert "starting from scratch" in fresh.stdout and (tmp_path / "typo-backprop.pt").is_file()


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size: must be int >= 1, got 0"),
    (["--mu", "-1"], "--mu: must be float > 0, got -1"),
    (["--optimizer", "adm"], "did you mean 'adam'"),
    (["--set", "backprop.mu=1"], "backprop has no option 'mu'"),
    (["--max-sample", "10"], "unrecognized arguments: --max-sample 10"),  # no silent abbreviation
])
def test_bad_option_values_are_one_line_errors(args, message, tmp_path):
    proc = run(*args, "--logdir", str(tmp_path), check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unknown_learner_is_a_clean_error(tmp_path):
    proc = run("--learner", "am-adam,nope", "--logdir", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script", ["stream", "continual", "soak", "bench", "rl"])
def test_a_repeated_learner_option_adds_to_the_list(script):
    """``--learner a --learner b,c`` is ``a,b,c`` in every script that takes a list of learners (a
    repeat used to replace the earlier value silently); one ``--learner`` replaces the default."""
    import importlib
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "scripts"))
    module = importlib.import_module(script)
    parser = module.build_parser() if hasattr(module, "build_parser") else None
    argv = ["--learner", "am-adam", "--learner", "backprop,am-mem"]
    if parser is not None:
        args = parser.parse_args(argv)
    else:
        args = module.parse_args(argv)
        args = args[0] if isinstance(args, tuple) else args
    assert args.learner == "am-adam,backprop,am-mem"
    one = parser.parse_args(["--learner", "backprop"]) if parser is not None else module.parse_args(["--learner", "backprop"])
    one = one[0] if isinstance(one, tuple) else one
    assert one.learner == "backprop"


def test_bench_also_takes_variants_or_none():
    """bench.py --also: learner variants parsed and checked by the learner's declaration; ``none``
    times no variant (the default is AM-Adam's autograd path)."""
    import importlib
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "scripts"))
    bench = importlib.import_module("bench")
    assert bench.parse_args([]).also == [("am-adam", {"fast": False})]
    assert bench.parse_args(["--also", "none"]).also == []
    assert bench.parse_args(["--also", "am-mem:sweeps=2"]).also == [("am-mem", {"sweeps": 2})]


def _summary_rows(stdout: str) -> dict[str, tuple[str, str]]:
    """learner -> (prequential, held-out) from stream.py's final table."""
    return {m[0]: (m[1], m[2]) for m in re.findall(r"^(\S+)\s+(0\.\d{4})\s+(0\.\d{4})\s", stdout, flags=re.M)}


@pytest.mark.slow
def test_torchrun_two_processes_learn_what_one_process_learns(tmp_path):
    """torchrun --nproc-per-node 2 scripts/stream.py: each process learns its shard of every batch
    (gloo), and the prequential and held-out accuracies are one process's; rank 0 alone prints and
    writes the checkpoints; a learner that cannot be data-parallel is skipped with its reason."""
    common = ["--learner", "am-mem,backprop,sbe", "--max-samples", "300", "--quiet", "--batch-size", "10"]
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([str(torchrun), "--nproc-per-node", "2", str(SCRIPT), *common, "--logdir", str(tmp_path / "two"),
                          "--checkpoint", str(tmp_path / "ck.pt")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run(*common, "--logdir", str(tmp_path / "one"))
    rows = _summary_rows(two.stdout)
    single = _summary_rows(one.stdout)
    assert set(rows) == {"am-mem", "backprop"} and rows == {k: single[k] for k in rows}, (two.stdout, one.stdout)
    assert len(re.findall(r"^learner +prequential", two.stdout, flags=re.M)) == 1  # rank 0 only
    assert "skipping sbe: SBE cannot be data-parallel" in two.stdout
    assert (tmp_path / "ck-am-mem.pt").is_file() and (tmp_path / "ck-backprop.pt").is_file()


def test_help():
    proc = run("--help")
    assert "--dataset" in proc.stdout and "--checkpoint" in proc.stdout


@pytest.mark.slow
def test_bench_smoke(data_root):
    """scripts/bench.py with a tiny budget: both tables, every learner row, a finite ratio."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--data-dir", str(data_root), "--rounds", "2",
         "--steps", "1", "--warmup", "1", "--solve-rounds", "1", "--solve-repeats", "1", "--threads", "1",
         "--strategy-rounds", "1", "--strategy-samples", "400", "--online-replay-rounds", "1",
         "--online-replay-subset", "600"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    ratios = dict(re.findall(r"^\| ([a-z][a-z\-]*(?: \([^)]*\))?) \| [\d.]+ \| ([\d.]+)x", proc.stdout, flags=re.M))
    import amstream

    mlp_learners = {c.registry_name for c in conformance_cases().values() if c.model == "mlp"}
    expected = {"backprop-adam", "am-adam (fast=False)", *(n for n in mlp_learners if n != "backprop")}
    assert expected <= set(ratios), proc.stdout  # every registered learner is timed, with no table to edit
    for name in set(amstream.LEARNERS) - mlp_learners:  # sequence learners: sequence.py times them
        assert f"note: {name} is not timed on the MLP" in proc.stdout
    assert float(ratios["backprop-adam"]) == 1.0
    # each step's matrix multiply-adds, counted: backprop's forward pass 200 x (784x100 + 100x100 + 100x10),
    # its weight gradients as many, and the input gradients of layers 2 and 3
    macs = dict(re.findall(r"^\| ([a-z][a-z\-]*) \| [\d.]+ \| [\d.]+x \[[^]]*\] \| ([\d.]+)M \|", proc.stdout, flags=re.M))
    assert float(macs["backprop-adam"]) == pytest.approx(200 * (2 * (784 * 100 + 100 * 100 + 100 * 10)
                                                                + 100 * 100 + 10 * 100) / 1e6, abs=0.05), proc.stdout
    assert float(macs["am-mem"]) > 4 * float(macs["backprop-adam"])  # the 785 x 785 memory and its sweep
    assert "sweep as blocked triangular solves" in proc.stdout and "device: CPU" in proc.stdout
    agreement = re.search(r"max \|blocked - loop\| / max \|W\| \| \| ([\d.e+-]+) \|", proc.stdout)
    assert agreement and float(agreement[1]) < 1e-4, proc.stdout
    overhead = re.search(r"^\| AM-Adam, AMStrategy\.train [^|]*\| [\d.]+ \| ([\d.]+)x", proc.stdout, flags=re.M)
    assert overhead and float(overhead[1]) > 0, proc.stdout
    naive = re.search(r"^\| backprop-Adam, Avalanche's Naive\.train [^|]*\| [\d.]+ \| ([\d.]+)x", proc.stdout, flags=re.M)
    assert naive and float(naive[1]) > 0, proc.stdout
    # the online-replay protocol: AMStrategy (backprop) trains exactly as OnlineNaive, so equal accuracy
    online = re.findall(r"^\| (Avalanche OnlineNaive|AMStrategy with a Backprop learner)[^|]*\| [\d.]+ \| [\d.]+x[^|]*\| "
                        r"([\d.]+) \|$", proc.stdout, flags=re.M)
    assert len(online) == 2 and online[0][1] == online[1][1], proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("options, network, learners", [
    ([], "784-100-100-10 MLP", {"backprop-adam", "am-adam", "am-adam (autograd path)", "am-mem"}),
    (["--hidden", "64", "--learner", "backprop-adam,am-mem"], "784-64-10 MLP", {"backprop-adam", "am-mem"}),
    (["--hidden", "32", "--learner", "dladmm,sbe"], "784-32-10 MLP", {"dladmm", "sbe"}),  # any registered one
    (["--sequences", "--hidden", "8", "--batch-size", "20", "--learner", "admm-rnn,backprop-adam"],
     "row-sequential Elman network, hidden 8", {"admm-rnn", "backprop-adam"}),
], ids=["default", "network-and-learners", "registered-learners", "sequences"])
def test_bench_compare_times_this_tree_against_a_revision(data_root, options, network, learners):
    """scripts/bench_compare.py: two workers, this tree and HEAD exported by git archive, the same
    learners; one row per learner with a finite ratio (``--compile`` builds the same learners with
    compile=True: its first steps compile, too long for this smoke test)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_compare.py"), "--against", "HEAD",
                           "--data-dir", str(data_root), "--rounds", "1", "--steps", "1", "--warmup", "1", *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"MNIST {network}," in proc.stdout
    rows = dict(re.findall(r"^\| ([a-z][a-z\- ()]*) \| [\d.]+ \| [\d.]+ \| ([\d.]+)x", proc.stdout, flags=re.M))
    assert set(rows) == learners, proc.stdout
    assert all(0 < float(r) < 100 for r in rows.values())
    # the test accuracy after the same steps: the same learners from the same code learn the same
    accuracies = re.findall(r"\| ([\d.]+)% / ([\d.]+)% \|$", proc.stdout, flags=re.M)
    assert len(accuracies) == len(learners) and all(0 < float(a) <= 100 for pair in accuracies for a in pair)
    unchanged = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "amstream"], cwd=ROOT).returncode == 0
    if unchanged:  # (an uncommitted change to amstream may move it)
        assert all(old == new for old, new in accuracies), proc.stdout


@pytest.mark.slow
def test_bench_stream_rl_and_distributed_sections(data_root):
    """The streaming section (Elec2 one sample at a time, each learner in its worker), the DQN
    section and the data-parallel section, on tiny budgets; deep-river and Stable-Baselines3 are measured where their environments
    exist (a note says so where they do not, as in CI)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--data-dir", str(data_root), "--threads", "1",
         "--section", "stream", "--stream-samples", "600", "--stream-learner", "backprop,am-mem",
         "--section", "rl", "--rl-steps", "1200", "--rl-rounds", "1", "--rl-learner", "am-adam",
         "--section", "distributed", "--processes", "2", "--distributed-steps", "2", "--warmup", "1",
         "--distributed-learner", "am-mem"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = dict(re.findall(r"^\| (backprop|am-mem|backprop, micro-batch 16|am-mem, micro-batch 16) \| ([\d,]+) \|",
                           proc.stdout, flags=re.M))
    assert set(rows) == {"backprop", "am-mem", "backprop, micro-batch 16", "am-mem, micro-batch 16"}, proc.stdout
    assert all(int(v.replace(",", "")) > 0 for v in rows.values())
    assert "deep-river 0.3.4, Classifier | " in proc.stdout or "note: deep-river is not measured" in proc.stderr
    dqn = re.search(r"^\| DQNAgent, am-adam \| ([\d,]+) \|", proc.stdout, flags=re.M)
    assert dqn and int(dqn[1].replace(",", "")) > 0, proc.stdout
    assert "Stable-Baselines3 2.9.2 DQN | " in proc.stdout or "note: Stable-Baselines3 is not measured" in proc.stderr
    # data-parallel AM-mem: 1 and 2 processes; the payload: the first layer's rows gathered (the batch,
    # 200, is smaller than its input, 785), the second layer's memory increments, the output gradient
    two = re.search(r"^\| am-mem \| 2 \| [\d,]+ \| [\d.]+x \| ([\d,.]+) KiB \|", proc.stdout, flags=re.M)
    payload = (2 * 100 * (785 + 100) + 101 * 101 + 100 * 101 + 10 * 101) * 4 / 1024
    assert two and payload < float(two[1].replace(",", "")) < payload + 1, proc.stdout
    assert re.search(r"^\| am-mem \| 1 \| [\d,]+ \| 1.00x \|", proc.stdout, flags=re.M), proc.stdout


def test_bench_rl_compiled_runs_warm_up_once_then_time_each_agent_both_ways(monkeypatch):
    """``--rl-compiled``: each amstream agent also runs with ``compile=True``, after one untimed
    2,000-step run (the compilation); the ratios are to Stable-Baselines3's runs of the same round.
    The worker processes are replaced by a recorder (the real ones take minutes)."""
    import sys as _sys
    from types import SimpleNamespace

    _sys.path.insert(0, str(ROOT / "scripts"))
    import _bench_rl

    calls = []
    speed = {("sb3", "eager"): 1000.0, ("am-adam", "eager"): 600.0, ("am-adam", "compiled"): 800.0}

    def fake_run(cmd, **kwargs):
        name, steps, mode = cmd[3], int(cmd[4]), cmd[6]
        calls.append((name, steps, mode))
        return SimpleNamespace(returncode=0, stdout=f"{speed[name, mode]}\n", stderr="")

    monkeypatch.setattr(_bench_rl, "sb3_path", lambda make: ROOT)
    monkeypatch.setattr(_bench_rl.subprocess, "run", fake_run)
    rows = _bench_rl.dqn_throughput(["am-adam"], steps=500, rounds=2, make_envs=False, compiled=True)
    assert calls[0] == ("am-adam", 2000, "compiled")  # the warm-up, once
    assert calls[1:] == [("sb3", 500, "eager"), ("am-adam", 500, "eager"), ("am-adam", 500, "compiled")] * 2
    assert {row["runner"]: row["ratio"] for row in rows} == {
        "Stable-Baselines3 2.9.2 DQN": 1.0, "DQNAgent, am-adam": 0.6, "DQNAgent, am-adam, compile=True": 0.8}


def test_bench_bad_option_is_a_clean_error():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--batch-size", "-5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--batch-size: must be int >= 1, got -5" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_missing_data_is_a_clean_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--data-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "bench.py: error:" in proc.stderr and "Traceback" not in proc.stderr


CONTINUAL = ROOT / "scripts" / "continual.py"


def run_continual(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONTINUAL), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})


@pytest.mark.slow
def test_continual_compares_learners_with_a_plugin(tmp_path):
    proc = run_continual("--learner", "am-adam,am-mem", "--plugins", "replay", "--quiet", "--logdir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "DeprecationWarning" not in proc.stderr  # --quiet: not even Avalanche's replay warning
    rows = dict(re.findall(r"^(am-adam|am-mem)\s+([\d.]+)\s+[-\d.]+\s+[-\d.]+\s+\d+\s+[\d.]+$", proc.stdout, flags=re.M))
    assert set(rows) == {"am-adam", "am-mem"}, proc.stdout
    assert float(rows["am-mem"]) > 0.6  # replay on split digits: measured 0.93
    assert proc.stdout.count("accuracy matrix") == 2
    assert (tmp_path / "continual-split-digits.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("am-adam", "am-mem"):
        assert list(tmp_path.glob(f"split-digits-{name}-*/events.out.tfevents.*")), name


@pytest.mark.slow
def test_continual_under_torchrun_reports_one_process_results_from_rank_0(tmp_path):
    """torchrun --nproc-per-node 2 scripts/continual.py: the distributed sampler shards each
    experience and the replay buffer, the learners are data-parallel, every rank evaluates the whole
    test stream; rank 0 alone prints, logs and writes the JSON; a learner that cannot be
    data-parallel is skipped with its reason. The matrices are one process's (AM-mem in float32
    differs in the last digits after a few hundred steps, so it is compared in the float64 test of
    tests/test_distributed.py)."""
    common = ["--learner", "backprop,am-adam,sbe", "--plugins", "replay", "--experiences", "2", "--no-shuffle",
              "--batch-size", "16", "--quiet"]
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([str(torchrun), "--nproc-per-node", "2", str(CONTINUAL), *common, "--logdir",
                          str(tmp_path / "two"), "--json", str(tmp_path / "two.json")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_continual(*common, "--logdir", str(tmp_path / "one"), "--json", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert "data-parallel over 2 processes" in two.stdout and two.stdout.count("accuracy matrix, backprop") == 1
    assert "skipping sbe: SBE cannot be data-parallel" in two.stdout
    results = {n: json.loads((tmp_path / f"{n}.json").read_text())["results"] for n in ("one", "two")}
    assert set(results["two"]) == {"backprop", "am-adam"}
    for name in ("backprop", "am-adam"):
        two_matrix, one_matrix = results["two"][name]["matrix"], results["one"][name]["matrix"]
        assert [pytest.approx(row, abs=1e-9) for row in one_matrix] == two_matrix, name
        assert results["two"][name]["steps"] == results["one"][name]["steps"] > 0
        assert len(list((tmp_path / "two").glob(f"split-digits-{name}-*/events.out.tfevents.*"))) == 1
    # the other plugins under the process group, all at once (their penalties add up)
    plugins = subprocess.run([str(torchrun), "--nproc-per-node", "2", str(CONTINUAL), "--learner", "am-mem", "--plugins",
                              "gdumb,ewc,si,mas,rwalk,lwf", "--experiences", "2", "--quiet", "--logdir",
                              str(tmp_path / "plugins")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert plugins.returncode == 0, plugins.stderr[-3000:]
    assert re.search(r"^am-mem\s+0\.\d{4}", plugins.stdout, flags=re.M), plugins.stdout
    odd = subprocess.run([str(torchrun), "--nproc-per-node", "2", str(CONTINUAL), *common[:2], "--batch-size", "15",
                          "--quiet", "--logdir", str(tmp_path / "odd")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert odd.returncode != 0 and "not a multiple of the 2 processes" in odd.stderr


@pytest.mark.slow
def test_continual_under_torchrun_stops_and_resumes_on_as_many_or_fewer_processes(tmp_path):
    """torchrun --nproc-per-node 2 with --checkpoint: rank 0 writes after every experience once the
    processes agree on the strategy's state; stopped after two experiences and resumed on two
    processes it gives the uninterrupted two-process matrix, and the checkpoint resumes on one
    process too. RWalk, whose scores differ across processes, is refused before anything runs."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    common = ["--learner", "am-adam", "--plugins", "replay,ewc,lwf", "--batch-size", "16", "--quiet"]

    def two(*args):
        proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", str(CONTINUAL), *common, *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    two("--logdir", str(tmp_path / "whole"), "--json", str(tmp_path / "whole.json"))
    parts = ["--logdir", str(tmp_path / "parts"), "--checkpoint", str(tmp_path / "ck.pt")]
    assert "stopped after 2 experience(s)" in two(*parts, "--stop-after-experiences", "2").stdout
    shutil.copy(tmp_path / "ck-am-adam.pt", tmp_path / "one-am-adam.pt")
    resumed = two(*parts, "--resume", "--json", str(tmp_path / "parts.json"))
    assert resumed.stdout.count("resumed from") == 1  # rank 0 speaks
    whole, parts_result = (load_continual_results(tmp_path / f"{n}.json")["am-adam"] for n in ("whole", "parts"))
    assert parts_result["matrix"] == whole["matrix"] and parts_result["steps"] == whole["steps"]
    one = run_continual(*common, "--logdir", str(tmp_path / "one"), "--checkpoint", str(tmp_path / "one.pt"),
                        "--resume", "--json", str(tmp_path / "one.json"))
    assert one.returncode == 0 and "resumed from" in one.stdout, one.stderr[-3000:]
    matrix = load_continual_results(tmp_path / "one.json")["am-adam"]["matrix"]
    assert matrix[:2] == whole["matrix"][:2] and len(matrix) == 5  # the first two rows come from the checkpoint
    rwalk = subprocess.run([str(torchrun), "--nproc-per-node", "2", str(CONTINUAL), "--learner", "am-adam",
                            "--plugins", "rwalk", "--quiet", "--checkpoint", str(tmp_path / "rw.pt"),
                            "--logdir", str(tmp_path / "rw")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rwalk.returncode != 0 and "RWalk's scores come from each process's shard" in rwalk.stderr
    assert not (tmp_path / "rw").exists() and not list(tmp_path.glob("rw*.pt"))


@pytest.mark.slow
def test_continual_online_stream(tmp_path):
    proc = run_continual("--learner", "am-mem", "--online", "32", "--experiences", "2", "--quiet",
                         "--logdir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "online sub-experiences of 32" in proc.stdout


@pytest.mark.slow
def test_continual_growing_head_hyperparameters_and_json(tmp_path):
    proc = run_continual("--learner", "am-adam,backprop", "--plugins", "replay", "--growing-head", "--lr", "0.002",
                         "--optimizer", "sgd", "--set", "backprop.lr=0.05", "--quiet", "--logdir", str(tmp_path),
                         "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["options"]["lr"] == 0.002 and record["options"]["growing_head"] is True
    # --lr reaches every learner that declares lr, --set only the one it names
    assert record["results"]["am-adam"]["hparams"]["lr"] == 0.002
    assert record["results"]["backprop"]["hparams"]["lr"] == 0.05
    assert record["results"]["backprop"]["hparams"]["optimizer"] == "sgd"
    for name in ("am-adam", "backprop"):
        result = record["results"][name]
        assert len(result["matrix"]) == 5 and all(len(row) == 5 for row in result["matrix"])
        assert result["average_accuracy"] == pytest.approx(sum(result["matrix"][-1]) / 5)
    assert record["results"]["am-adam"]["average_accuracy"] > 0.5  # replay, ten classes; chance 0.1


def load_continual_results(path: Path) -> dict:
    return json.loads(path.read_text())["results"]


@pytest.mark.parametrize("learner, options", [
    ("am-adam", ["--plugins", "replay-balanced,si,lwf"]),
    ("am-mem", ["--plugins", "gdumb"]),
    ("am-adam", ["--plugins", "ewc,mas,rwalk"]),
    ("backprop", ["--plugins", "replay,lwf", "--growing-head", "--online", "40"]),
])
def test_continual_stopped_and_resumed_is_the_run_never_stopped(learner, options, tmp_path, capsys):
    """--checkpoint after every experience; a run stopped after two experiences, resumed, stopped
    again after one more and resumed to the end gives the accuracy matrix of the run never stopped:
    every plugin's state (replay buffers, importances, LwF's previous model, GDumb's initial model),
    the strategy's clock, the RNGs, the forgetting metrics and a grown output head come back.
    TensorBoard goes on in the interrupted run's folder, one point per experience."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    continual = load_script("continual")
    common = ["--learner", learner, *options, "--quiet", "--checkpoint", str(tmp_path / "ck.pt")]
    continual.main([*common, "--logdir", str(tmp_path / "whole"), "--json", str(tmp_path / "whole.json")])
    resumed = [*common, "--logdir", str(tmp_path / "parts")]
    continual.main([*resumed, "--stop-after-experiences", "2"])
    continual.main([*resumed, "--resume", "--stop-after-experiences", "1"])
    continual.main([*resumed, "--resume", "--json", str(tmp_path / "parts.json")])
    out = capsys.readouterr().out
    assert "stopped after 2 experience(s)" in out and "after experience 1 (step" in out
    whole, parts = (load_continual_results(tmp_path / f"{n}.json")[learner] for n in ("whole", "parts"))
    assert parts["matrix"] == whole["matrix"] and parts["steps"] == whole["steps"]
    curves = {}
    for run in ("whole", "parts"):
        folders = list((tmp_path / run).glob(f"split-digits-{learner}-*"))
        assert len(folders) == 1  # the resumed runs wrote on in the first one's folder
        events = EventAccumulator(str(folders[0]), size_guidance={"scalars": 0})
        events.Reload()
        curves[run] = [(e.step, e.value) for e in events.Scalars("StreamForgetting/eval_phase/test_stream")]
    # one point per experience, at the same steps, the later ones from the restored first accuracies
    assert len(curves["parts"]) == 5 and curves["parts"] == curves["whole"]


def test_continual_resume_refuses_other_settings_and_says_which(tmp_path, capsys):
    continual = load_script("continual")
    common = ["--learner", "am-adam", "--plugins", "replay", "--quiet", "--checkpoint", str(tmp_path / "ck.pt"),
              "--logdir", str(tmp_path)]
    continual.main([*common, "--stop-after-experiences", "1"])
    before = (tmp_path / "ck-am-adam.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        continual.main([*common, "--resume", "--mem-size", "100"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "other settings {'mem_size': 500}" in err and "{'mem_size': 100}" in err
    assert (tmp_path / "ck-am-adam.pt").read_bytes() == before  # nothing was written
    (tmp_path / "ck-am-adam.pt").write_bytes(b"not a checkpoint")  # a damaged file: named, nothing written
    runs_before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        continual.main([*common, "--resume"])
    assert exit_info.value.code == 2 and "cannot read checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == runs_before


@pytest.mark.parametrize("args, message", [
    (["--resume"], "--resume needs --checkpoint PATH"),
    (["--checkpoint", "{tmp}/typo.pt", "--resume"], "no checkpoint at"),
    (["--plugins", "gem"], "unknown plugin"),
    (["--learner", "nope"], "unknown learner"),
    (["--batch-size", "0"], "--batch-size: must be int >= 1, got 0"),
    (["--batch-size", "-5"], "--batch-size: must be int >= 1, got -5"),
    (["--benchmark", "split-mnist", "--data-dir", "{tmp}"], "Missing data file"),
])
def test_continual_bad_input_is_a_clean_error(args, message, tmp_path):
    proc = run_continual(*[a.replace("{tmp}", str(tmp_path)) for a in args], "--logdir", str(tmp_path))
    assert proc.returncode == 2
    assert message.lower() in proc.stderr.lower() and "Traceback" not in proc.stderr


RL = ROOT / "scripts" / "rl.py"


def run_rl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RL), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})


def test_rl_compares_learners_and_seeds(tmp_path):
    proc = run_rl("--env", "CartPole-v1", "--learner", "am-adam,backprop", "--seeds", "1,2", "--total-timesteps", "600",
                  "--learning-starts", "200", "--train-frequency", "4", "--batch-size", "32", "--eval-every", "300",
                  "--eval-episodes", "2", "--final-eval-episodes", "2", "--quiet", "--logdir", str(tmp_path),
                  "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    rows = dict(re.findall(r"^(am-adam|backprop)\s+2\s+([\d.]+ ± [\d.]+)", proc.stdout, flags=re.M))
    assert set(rows) == {"am-adam", "backprop"}, proc.stdout
    record = json.loads((tmp_path / "r.json").read_text())
    assert len(record["runs"]) == 4 and all(len(r["eval_history"]) == 2 for r in record["runs"])
    assert (tmp_path / "rl-CartPole-v1.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(tmp_path.glob("CartPole-v1__dqn-*/events.out.tfevents.*"))) == 4


@pytest.mark.slow
def test_rl_parallel_jobs_give_the_same_runs(tmp_path):
    args = ("--env", "CartPole-v1", "--learner", "am-adam,backprop", "--seeds", "1,2", "--total-timesteps", "600",
            "--learning-starts", "200", "--train-frequency", "4", "--batch-size", "32", "--eval-every", "300",
            "--eval-episodes", "2", "--final-eval-episodes", "2", "--quiet", "--logdir", str(tmp_path))
    one_by_one = run_rl(*args, "--json", str(tmp_path / "a.json"))
    parallel = run_rl(*args, "--jobs", "2", "--json", str(tmp_path / "b.json"))
    assert one_by_one.returncode == 0 and parallel.returncode == 0, parallel.stderr
    assert "4 runs, 2 at a time" in parallel.stdout
    a, b = (json.loads((tmp_path / f).read_text())["runs"] for f in ("a.json", "b.json"))
    assert [(r["learner"], r["seed"]) for r in b] == [("am-adam", 1), ("am-adam", 2), ("backprop", 1), ("backprop", 2)]
    for x, y in zip(a, b):
        assert x["eval_history"] == y["eval_history"] and x["final_mean"] == y["final_mean"]


def test_rl_rescaled_observations_and_am_mem_options(tmp_path):
    """--rescale-obs and AM-mem's --damping-scale reach the run: the learner's hyperparameters in
    the TensorBoard run say so, and the run completes."""
    proc = run_rl("--env", "MountainCar-v0", "--rescale-obs", "--learner", "am-mem", "--damping-scale", "diagonal",
                  "--total-timesteps", "300", "--learning-starts", "100", "--eval-every", "300", "--eval-episodes", "1",
                  "--final-eval-episodes", "1", "--quiet", "--logdir", str(tmp_path), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["final_mean"] == -200.0
    (events,) = tmp_path.glob("MountainCar-v0__dqn-am-mem__1-*/events.out.tfevents.*")
    logged = events.read_bytes()
    assert b"learner.damping_scale|diagonal|" in logged and b"observations rescaled to [-1, 1]" in logged


def test_rl_task_sequence_prints_a_return_matrix(tmp_path):
    proc = run_rl("--tasks", "cartpole-physics", "--learner", "am-mem", "--steps-per-task", "200",
                  "--learning-starts", "100", "--final-eval-episodes", "1", "--quiet", "--logdir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "return matrix, am-mem seed 1" in proc.stdout
    assert len(re.findall(r"^  \d \|(?:\s+[\d.]+){4}\s+\(", proc.stdout, flags=re.M)) == 4, proc.stdout
    assert (tmp_path / "rl-cartpole-physics.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--env", "CartPol-v1"], "unknown Gymnasium environment id"),
    (["--env", "Pendulum-v1"], "discrete action space"),
    (["--learner", "sgd"], "unknown learner"),
    (["--tasks", "nope"], "invalid choice"),
    (["--env", "CartPole-v1", "--rescale-obs"], "infinite bounds"),
    (["--tasks", "cartpole-physics", "--rescale-obs"], "--rescale-obs applies to --env"),
])
def test_rl_bad_input_is_a_clean_error(args, message, tmp_path):
    proc = run_rl(*args, "--total-timesteps", "10", "--logdir", str(tmp_path))
    assert proc.returncode == 2
    assert message.lower() in proc.stderr.lower() and "Traceback" not in proc.stderr


# -------------------------------------------------------------- the registry is the only table
def load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_learner_registered_in_amstream_learners_is_available_to_every_script(monkeypatch, tmp_path, capsys):
    """RidgeHead (tests/doubles.py) is registered in amstream.LEARNERS and nowhere else: stream.py,
    continual.py and rl.py offer it, derive its options from its declared hyperparameters, and run it."""
    import amstream
    from doubles import RidgeHead

    monkeypatch.setitem(amstream.LEARNERS, "ridge-head", RidgeHead)
    stream, continual, rl = load_script("stream"), load_script("continual"), load_script("rl")
    for script in (stream, continual, rl):
        text = script.build_parser().format_help()
        assert "ridge-head" in text and "--ridge RIDGE" in text and "--penalty-lr" in text

    stream.main(["--learner", "ridge-head,backprop", "--max-samples", "300", "--ridge", "2.0", "--quiet",
                 "--logdir", str(tmp_path / "stream")])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("ridge-head "))
    assert float(row.split()[2]) > 0.3  # held-out accuracy of a ridge head on random ReLU features

    continual.main(["--learner", "ridge-head", "--plugins", "replay,ewc", "--set", "ridge-head.ridge=3",
                    "--quiet", "--logdir", str(tmp_path / "cl"), "--json", str(tmp_path / "cl.json")])
    record = json.loads((tmp_path / "cl.json").read_text())
    assert record["results"]["ridge-head"]["hparams"]["ridge"] == 3.0
    assert record["results"]["ridge-head"]["average_accuracy"] > 0.3

    rl.main(["--learner", "ridge-head", "--total-timesteps", "400", "--learning-starts", "100",
             "--final-eval-episodes", "2", "--eval-episodes", "1", "--quiet", "--logdir", str(tmp_path / "rl"),
             "--json", str(tmp_path / "rl.json")])
    runs = json.loads((tmp_path / "rl.json").read_text())["runs"]
    assert runs[0]["learner"] == "ridge-head" and runs[0]["final_mean"] > 0


def test_a_learner_option_named_like_a_script_option_is_set_with_set_only():
    """rl.py's --gamma is the discount; LocoProp's gamma (its target step) is reachable with --set
    and never receives the discount."""
    rl = load_script("rl")
    parser = rl.build_parser()
    args = parser.parse_args(["--learner", "locoprop-m", "--gamma", "0.9", "--set", "locoprop-m.gamma=3",
                              "--lr", "0.002"])
    common = sys.modules["_common"]
    assert args.gamma == 0.9
    assert common.learner_kwargs("locoprop-m", args) == {"gamma": 3.0, "lr": 0.002}
    assert common.learner_kwargs("backprop", args) == {"lr": 0.002}
    assert "the script has its own --gamma" in " ".join(parser.format_help().split())


@pytest.mark.parametrize("name", __import__("amstream").LEARNERS)
def test_every_registered_learner_runs_by_name_in_every_script(name, tmp_path, capsys):
    """Generated from the registry: stream.py (interrupted, then resumed from its checkpoint),
    continual.py with Replay (and the same run interrupted after two experiences and resumed), and
    rl.py on CartPole, each with the learner's defaults."""
    stream, continual, rl = load_script("stream"), load_script("continual"), load_script("rl")
    sequence_only = not any(c.model == "mlp" for c in conformance_cases().values() if c.registry_name == name)
    common = ["--learner", name, "--max-samples", "200", "--quiet", "--logdir", str(tmp_path / "s"),
              "--checkpoint", str(tmp_path / "ck.pt"), *(["--model", "elman"] if sequence_only else [])]
    stream.main([*common, "--stop-after-steps", "7"])
    stream.main([*common, "--resume"])
    out = capsys.readouterr().out
    assert "resumed from" in out and any(line.startswith(f"{name} ") for line in out.splitlines())
    if sequence_only:  # ADMMiRNN: the MLPs of continual.py and rl.py are refused in one line, by name
        for script, args in ((continual, ["--experiences", "5"]), (rl, ["--total-timesteps", "300"])):
            with pytest.raises(SystemExit) as exit_info:
                script.main(["--learner", name, "--quiet", "--logdir", str(tmp_path / "x"), *args])
            captured = capsys.readouterr()
            assert exit_info.value.code == 2 and "ElmanRNN" in captured.out + captured.err
        return
    continual_common = ["--learner", name, "--plugins", "replay", "--quiet", "--experiences", "5",
                        "--logdir", str(tmp_path / "c"), "--checkpoint", str(tmp_path / "c" / "ck.pt")]
    continual.main([*continual_common, "--json", str(tmp_path / "c.json")])
    continual.main([*continual_common, "--stop-after-experiences", "2"])
    continual.main([*continual_common, "--resume", "--json", str(tmp_path / "c-resumed.json")])
    result, resumed = (json.loads((tmp_path / f).read_text())["results"][name] for f in ("c.json", "c-resumed.json"))
    assert result["steps"] > 0 and resumed["steps"] == result["steps"]
    assert resumed["matrix"] == result["matrix"]  # stopped after 2 experiences and resumed: the same run
    rl.main(["--learner", name, "--total-timesteps", "300", "--learning-starts", "100", "--eval-episodes", "1",
             "--final-eval-episodes", "1", "--quiet", "--logdir", str(tmp_path / "r"), "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["final_mean"] > 0


def test_autoencoder_experiment_runs_any_learner(tmp_path):
    """scripts/autoencoder.py with a tiny budget: each run's curve, the table, the plot; a bad run
    spec is a one-line error."""
    script = ROOT / "scripts" / "autoencoder.py"
    common = [sys.executable, str(script), "--max-samples", "400", "--batch-size", "200", "--epochs", "2",
              "--schedule-epochs", "10", "--quiet", "--json", str(tmp_path / "ae.json"), "--plot", str(tmp_path / "ae.png")]
    proc = subprocess.run([*common, "--run", "locoprop-m:preset=reference,local_steps=2", "--run",
                           "backprop:optimizer=tf-rmsprop,lr=1e-5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "ae.json").read_text())["results"]
    assert [r["learner"] for r in results] == ["locoprop-m", "backprop"]
    # a cross-entropy against pixels in [0, 1] is positive
    assert all(len(r["curve"]) == 2 and r["curve"][-1][1] > 0 for r in results)
    assert results[0]["hparams"]["local_optimizer"] == "rmsprop-tf" and results[1]["hparams"]["optimizer"] == "TFRMSprop"
    assert (tmp_path / "ae.png").read_bytes()[:4] == b"\x89PNG" and "| run | epoch 1 | epoch 2 |" in proc.stdout
    bad = subprocess.run([*common, "--run", "locoprop-m:gama=3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no hyperparameter 'gama'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_softmax_regression_and_full_batch_experiments_run(tmp_path):
    """ADMM-Softmax's and dlADMM's experiments with tiny budgets: curves in the JSON, a bad run spec
    is a one-line error."""
    scripts = ROOT / "scripts"
    proc = subprocess.run([sys.executable, str(scripts / "softmax_regression.py"), "--seconds", "1", "--method", "admm",
                           "--method", "adam", "--json", str(tmp_path / "s.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "s.json").read_text())["results"]
    assert set(results) == {"admm", "adam"} and all(r["curve"] for r in results.values())
    assert results["adam"]["best_validation"] > 0.8  # one second of Adam on MNIST pixels
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    full_batch = [sys.executable, str(scripts / "full_batch.py"), "--run", "dladmm:preset=reference", "--hidden", "8",
                  "--max-samples", "5000"]

    def run(name, *options):
        proc = subprocess.run([*full_batch, *options, "--json", str(tmp_path / name)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "mnist: 5000 training images" in proc.stdout
        return json.loads((tmp_path / name).read_text())

    whole = run("f.json", "--iterations", "4")
    assert [c[0] for c in whole["curve"]] == [1, 2, 3, 4] and whole["peak_mb"] > 0
    # stopped after 2 iterations and resumed to 4: the uninterrupted run's accuracies and costs
    run("half.json", "--iterations", "2", "--checkpoint", str(tmp_path / "run.pt"))
    resumed = run("resumed.json", "--iterations", "4", "--checkpoint", str(tmp_path / "run.pt"), "--resume")
    assert [c[::2] for c in resumed["curve"]] == [c[::2] for c in whole["curve"]]
    used = subprocess.run([*full_batch, "--checkpoint", str(tmp_path / "run.pt")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert used.returncode == 2 and "add --resume" in used.stderr
    other = subprocess.run([*full_batch[:3], "dladmm:step_size=bound", *full_batch[4:], "--checkpoint",
                            str(tmp_path / "run.pt"), "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "holds the run" in other.stderr and "Traceback" not in other.stderr
    bad = subprocess.run([sys.executable, str(scripts / "full_batch.py"), "--run", "dladmm:step_size=wide"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid step_size" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_sequence_experiment_runs_every_task(tmp_path):
    """scripts/sequence.py with tiny budgets: text (held-out nats from ln 61 down), row MNIST, the
    adding problem and a robustness grid; a bad run spec is a one-line error."""
    script = [sys.executable, str(ROOT / "scripts" / "sequence.py"), "--quiet", "--hidden", "16"]
    text = subprocess.run([*script, "--task", "text", "--seconds", "2", "--run", "admm-rnn", "--run",
                           "backprop@gru:lr=3e-3", "--json", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert text.returncode == 0, text.stderr
    results = json.loads((tmp_path / "t.json").read_text())["results"]
    assert [r["model"] for r in results] == ["elman", "gru"]
    for r in results:
        assert abs(r["curve"][0][2] - 4.11) < 0.05 and r["final"] < r["curve"][0][2]  # learns from ln 61
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    mnist = subprocess.run([*script, "--task", "permuted-mnist", "--max-samples", "600", "--batch-size", "50",
                            "--run", "frank-wolfe", "--run", "backprop", "--epochs", "2", "--plot", str(tmp_path / "m.png")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert mnist.returncode == 0, mnist.stderr
    assert "| backprop | " in mnist.stdout and "epoch 2" in mnist.stdout
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"  # not under the repository's runs/
    adding = subprocess.run([*script, "--task", "adding", "--length", "10", "--steps", "20", "--eval-every", "10",
                             "--run", "backprop", "--grid", "--init-scales", "1", "--lr-factors", "1,10"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert adding.returncode == 0, adding.stderr
    assert "converged (of 2)" in adding.stdout
    bad = subprocess.run([*script, "--run", "admm-rnn@lstm"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown model 'lstm'" in bad.stderr and "Traceback" not in bad.stderr
