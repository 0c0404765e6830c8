"""Workers keep the memory a batch freed for the next one: a freed block of a
batch's size is reused, not faulted in afresh (glibc malloc, tuned at worker start)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import ctypes, resource, sys
if sys.argv[1] == "tuned":
    from dataflare.daemon.worker import _keep_freed_memory
    _keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 4 << 20  # a large batch's frame
def cycle():
    # Three blocks live at once, freed together, as a batch's buffers are.
    blocks = [libc.malloc(size) for _ in range(3)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_freed_batch_memory_is_reused_without_page_faults() -> None:
    pages = 20 * 3 * (4 << 20) // 4096
    default, tuned = _faults("default"), _faults("tuned")
    assert default > pages // 2  # glibc's defaults: fresh pages every time
    assert tuned < pages // 50
