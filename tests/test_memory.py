"""The command's memory policy: glibc returns freed multi-MB tensors to the OS."""

import platform
import subprocess
import sys

import pytest

from wemoe.core.memory import return_freed_memory_to_os

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_freed_tensors_leave_resident_memory():
    """Allocate 60 x 8 MB tensors between small live ones, free them: with the policy the
    process gives the memory back; the same script without it keeps most of it (the
    dynamic threshold moves them into the heap after the first free)."""
    script = r"""
import re, sys, torch
from wemoe.core.memory import return_freed_memory_to_os
if sys.argv[1] == "on":
    assert return_freed_memory_to_os()
def rss():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
x = torch.ones(2 << 20); del x  # an mmapped block freed: glibc raises its threshold
start = rss()
big, small = [], []
for i in range(60):
    big.append(torch.ones(2 << 20))   # 8 MB
    small.append(torch.ones(64))      # keeps the heap top busy
del big
print((rss() - start) / 2**20)
"""
    held = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        held[mode] = float(out.stdout.strip().splitlines()[-1])
    assert held["on"] < 50, held  # MB still resident after freeing 480 MB
    assert held["off"] > held["on"], held


def test_policy_call_reports_support():
    assert return_freed_memory_to_os() is GLIBC
