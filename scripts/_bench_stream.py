"""The streaming section of ``scripts/bench.py``: amstream against river's deep-river, one sample at a time.

The protocol of an online-learning library (river's ``progressive_val_score``): Elec2 in time order,
each sample a dict of its 8 features, first ``predict_one`` (scored), then ``learn_one``. Every
runner trains the same 8-32-2 ReLU MLP (the same initial weights, from ``torch.manual_seed(0)``)
with Adam at 1e-3 where the learner uses Adam, one torch thread.

deep-river pins an older torch than amstream's, so it runs in its own virtual environment
(``.bench-envs/deep-river``, made on request: ``--make-envs``). Each runner is a worker process; the
parent hands every worker the next chunk of the stream in turn, so all of them run under the same
machine conditions, and reports samples per second as ratios to deep-river's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / ".bench-envs"
#: the libraries measured against, each in its own environment: name -> (pip requirement, import check)
#: (deep-river 0.3.4 imports pytest without declaring it)
FOREIGN = {
    "deep-river": ("deep-river==0.3.4 pytest", "import deep_river.classification"),
}

WORKER = r"""
import json, sys, time
import numpy as np
import torch
torch.set_num_threads(1)
kind, spec, data = sys.argv[1], json.loads(sys.argv[2]), np.load(sys.argv[3])
names = [str(n) for n in data["names"]]
rows = [dict(zip(names, map(float, r))) for r in data["x"]]
labels = [int(v) for v in data["y"]]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(len(names), 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
if kind == "deep-river":
    from deep_river.classification import Classifier
    learner = Classifier(module=model, loss_fn="cross_entropy", optimizer_fn="adam", lr=1e-3, seed=0)
    learner.observed_classes.update([0, 1])  # both classes known from the start, as amstream's 2 outputs
else:
    sys.path.insert(0, spec["root"])
    import amstream
    learner = amstream.LEARNERS[spec["learner"]](model, device="cpu", **spec["kwargs"])
    if spec["micro_batch"] > 1:
        learner.set_micro_batch(spec["micro_batch"])
print(json.dumps("ready"), flush=True)
cursor, correct = 0, 0
for line in sys.stdin:
    n = json.loads(line)
    start = time.perf_counter()
    for i in range(cursor, min(cursor + n, len(rows))):
        x, y = rows[i], labels[i]
        correct += learner.predict_one(x) == y
        learner.learn_one(x, y)
    seconds = time.perf_counter() - start
    cursor = min(cursor + n, len(rows))
    print(json.dumps({"seconds": seconds, "seen": cursor, "correct": int(correct)}), flush=True)
"""


def foreign_python(name: str, make: bool) -> Path | None:
    """The interpreter of ``name``'s own environment; made (with a message) when ``make``, else None
    when it is missing."""
    requirement, check = FOREIGN[name]
    python = ENVS / name / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", check], capture_output=True).returncode == 0:
        return python
    if not make:
        return None
    print(f"making {ENVS / name}: pip install {requirement} (it brings its own torch; several GB, once)",
          file=sys.stderr, flush=True)
    venv.create(ENVS / name, with_pip=True, clear=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", *requirement.split()], check=True)
    return python


class _Worker:
    """One runner in its own process, started here; :meth:`wait_ready` waits for it to have imported
    its library and built its learner (the workers start side by side, then each is waited for)."""

    def __init__(self, label: str, python: Path | str, kind: str, spec: dict, data: str) -> None:
        self.label, self.seconds, self.seen, self.correct = label, 0.0, 0, 0
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen([str(python), "-c", WORKER, kind, json.dumps(spec), data], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def wait_ready(self) -> None:
        self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} worker stopped (its error is above)")
        return json.loads(line)

    def run(self, n: int) -> None:
        self.proc.stdin.write(json.dumps(n) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        self.seconds += reply["seconds"]
        self.seen, self.correct = reply["seen"], reply["correct"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def stream_throughput(runs: list[tuple[str, str, dict, int]], *, samples: int, chunk: int, make_envs: bool,
                      data_dir: str | None = None) -> list[dict]:
    """Samples per second of deep-river's ``Classifier`` and of each amstream run
    ``(label, learner, kwargs, micro_batch)`` on the first ``samples`` of Elec2, test-then-train,
    the workers taking ``chunk`` samples in turn. Returns one row per runner (deep-river first when
    its environment exists), with ``ratio`` to deep-river's samples per second."""
    from amstream.data import ELEC2_FEATURES, load_elec2

    elec2 = load_elec2(data_dir)
    n = min(samples, len(elec2))
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "elec2.npz")
        np.savez(data, x=elec2.x[:n].numpy(), y=elec2.y[:n].numpy(), names=np.array(ELEC2_FEATURES))
        workers = []
        python = foreign_python("deep-river", make_envs)
        if python is None:
            print(f"note: deep-river is not measured: its environment {ENVS / 'deep-river'} is missing "
                  "(add --make-envs to make it)", file=sys.stderr)
        try:
            if python is not None:
                workers.append(_Worker("deep-river 0.3.4, Classifier", python, "deep-river", {}, data))
            for label, learner, kwargs, micro_batch in runs:
                spec = {"root": str(ROOT), "learner": learner, "kwargs": kwargs, "micro_batch": micro_batch}
                workers.append(_Worker(label, sys.executable, "amstream", spec, data))
            for w in workers:
                w.wait_ready()
            for _ in range(0, n, chunk):
                for w in workers:
                    w.run(chunk)
        finally:
            for w in workers:
                w.close()
    base = workers[0].seen / workers[0].seconds if python is not None else None
    return [{"runner": w.label, "samples_per_s": w.seen / w.seconds, "accuracy": w.correct / w.seen,
             "ratio": (w.seen / w.seconds) / base if base else None} for w in workers]
