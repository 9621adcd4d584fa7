"""Shared test setup: small thread counts (CI has 2 cores, one per pytest-xdist worker) and deterministic seeds."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Under pytest-xdist (`-n 2`, README) each worker has one core: a second thread per worker, or per CLI run it
# starts, would only contend for it (a subprocess's OpenMP threads spin on a core the other worker is using).
UNDER_XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if UNDER_XDIST:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from minillm.devices import flush_denormals  # noqa: E402

torch.set_num_threads(1 if UNDER_XDIST else 2)
flush_denormals()  # as the trainer does, before any tensor work: every test computes in the trainer's mode


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models are latency-bound, and a second thread only adds inter-thread
    sync on a shared 2-core box. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

