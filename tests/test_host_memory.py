"""Process-wide CPU settings of training: glibc malloc keeps freed blocks (minillm/training/host_memory.py), and
subnormal floats are flushed to zero (minillm/devices.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from minillm.training.host_memory import keep_freed_memory

BLOCK_MIB = 40  # above glibc's highest dynamic mmap threshold (32 MiB): by default every such block is a new mmap

REUSE_FAULTS = f"""
import resource

def faults_of_reuse():
    block = bytearray({BLOCK_MIB} << 20)  # zero-filled: every page touched
    del block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray({BLOCK_MIB} << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""
PAGES = (BLOCK_MIB << 20) // 4096


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    # Without the setting (a fresh interpreter): a freed 40 MiB block goes back to the system, and the next one
    # faults in every page again. This is what makes the check below able to fail.
    out = subprocess.run([sys.executable, "-c", REUSE_FAULTS + "print(faults_of_reuse())"],
                         capture_output=True, text=True, check=True)
    assert int(out.stdout) > PAGES // 2

    assert keep_freed_memory()
    assert keep_freed_memory()  # idempotent
    namespace: dict = {}
    exec(REUSE_FAULTS, namespace)
    namespace["faults_of_reuse"]()  # the first block may still grow the heap
    assert namespace["faults_of_reuse"]() < PAGES // 100


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="FTZ/DAZ checked on x86 only")
def test_subnormal_floats_are_flushed_in_every_cpu_thread():
    """`flush_denormals` (called first by the trainer): subnormal products become zero, also those computed by
    torch's second OpenMP thread (started after the call), so no step pays the CPU's slow path for them."""
    code = (
        "import torch\n"
        "from minillm.devices import flush_denormals\n"
        "assert flush_denormals()\n"
        "x = torch.full((1 << 20,), 1e-39) * 0.5\n"  # both threads' halves: the inputs and products are subnormal
        "assert torch.get_num_threads() == 2 and x.max().item() == 0.0, x.max().item()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    unflushed = code.replace("assert flush_denormals()\n", "").replace("x.max().item() == 0.0", "x.max().item() > 0")
    done = subprocess.run([sys.executable, "-c", unflushed], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]  # the test can tell: without the call they stay
