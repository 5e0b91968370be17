"""The host (CPU) memory of a process: handing the C allocator's free pages back to the operating system.

XLA frees what it allocates while compiling a program, but glibc's malloc keeps those pages in its heaps:
spread over many small blocks between live ones, they are above the heap's top and its trim threshold never
sees them, so they stay resident. They would still be resident when the compiled program first runs and
allocates its temporaries, and count in the process's peak (benchmarks/README.md, host_memory: about
0.3 GiB after compiling T5-large's training step). `release_free_memory` returns them (glibc `malloc_trim`,
which also gives back free pages inside the heaps); it changes no value and costs milliseconds, so the stages
call it after each compilation of a large program and before its first run.
"""
import ctypes
import ctypes.util
import functools
import sys


@functools.lru_cache(maxsize=None)
def _malloc_trim():
  """glibc's `malloc_trim`, or None (another C library or platform: nothing to do)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    trim = libc.malloc_trim
  except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
    return None
  trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
  return trim


def release_free_memory() -> bool:
  """Return the allocator's free pages to the operating system; whether there was an allocator to ask."""
  trim = _malloc_trim()
  if trim is None:
    return False
  trim(0)
  return True
