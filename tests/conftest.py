"""Shared fixtures: the real-data directory, seeds, and the GPU marker."""
from __future__ import annotations

import os
from pathlib import Path

# One intra-op thread: the tests' tensors are small, and on a 2-vCPU machine a second OpenMP
# thread that gets descheduled stalls every parallel region (measured: the same test took 2 s or
# 27 s from run to run with 2 threads, always 2 s with 1). Subprocesses inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from amstream.data import data_dir  # noqa: E402

torch.set_num_threads(1)

REQUIRED_FILES = (
    "mnist/train-images-idx3-ubyte.gz",
    "mnist/t10k-images-idx3-ubyte.gz",
    "fashion-mnist/train-images-idx3-ubyte.gz",
    "elec2/elecNormNew.arff",
)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The directory holding the real data sets (``AMSTREAM_DATA``).

    In CI a missing file is a failure, never a skip: the accuracy tests must run there. Locally,
    without the files, the tests that need them are skipped.
    """
    root = data_dir()
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        message = f"real data files missing under {root}: {missing} (set AMSTREAM_DATA)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The modules whose tests start scripts or processes (2-10 s each, the "slow" ones 8-70 s): run
# first, the slow ones before all, so that with several workers (make test: pytest-xdist) the short
# tests fill in around them instead of one worker finishing a long test alone at the end.
LONG_FIRST = ("test_scripts.py", "test_distributed.py", "test_reconstruction.py")


def _start_order(item) -> int:
    return 0 if "slow" in item.keywords else 1 if item.path.name in LONG_FIRST else 2


def pytest_collection_modifyitems(config, items):
    items.sort(key=_start_order)  # stable: the order within each group stays
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
