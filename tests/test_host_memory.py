"""glibc malloc tuning for CPU training: freed blocks stay in the heap for the next step instead of coming back as
fresh, zero-filled pages."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from minillm.training import host_memory

STEPS_SCRIPT = """
import resource, sys, torch
from minillm.training import host_memory
torch.set_num_threads(1)
if sys.argv[1] == "tuned":
    assert host_memory.keep_freed_memory()
def step():  # a step's activations: allocated, touched, all freed at the end
    activations = [torch.ones(1 << 20) for _ in range(10)]  # 10 x 4 MiB
    del activations
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc"
)


def _page_faults_per_step(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", STEPS_SCRIPT, mode], capture_output=True, text=True, env=env,
                         check=True)
    return float(out.stdout.split()[-1])


@glibc_only
def test_freed_blocks_are_reused_without_page_faults():
    default, tuned = _page_faults_per_step("default"), _page_faults_per_step("tuned")
    # glibc's defaults trim the freed 40 MiB off the heap and fault it back in (about 1,000 faults per step here);
    # tuned, the blocks are reused (the remainder is the kernel's own sampling faults)
    assert tuned * 3 < default, (default, tuned)


@glibc_only
@pytest.mark.parametrize("variable, value", [("MALLOC_TRIM_THRESHOLD_", "131072"),
                                             ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")])
def test_the_users_own_malloc_settings_stand(variable, value, monkeypatch):
    monkeypatch.setenv(variable, value)
    assert host_memory.keep_freed_memory() is False
