"""Process-wide tuning of the ranker process for latency (applied by `run_ranker`, not by tests).

- **BLAS threads.** numpy's OpenBLAS starts one thread per core and spins them up for every small matrix
  product (the ranker's 100x100 MMR similarity). On a 2-core box shared with the vision process those
  threads fight the gRPC threads: measured here, one Rank with 1,000 candidates took 2.8 ms with the
  default and 0.6 ms with one BLAS thread (and the p99 tail fell from ~16 ms to under 1 ms). The ranker's
  matrices are tiny, so one thread is always right; `serving.blas_threads` can change it.
- **malloc.** glibc raises its mmap threshold every time a large block is freed, after which arrays of a
  few hundred KB (a session's prepared ranking state) come from the heap arenas of whichever gRPC thread
  made them and stay there after the session ends: RSS creeps up under a long, churning load. A fixed
  threshold (64 KB) keeps such arrays in their own mappings, returned to the kernel on free, and two
  arenas instead of 8 x cores keep the small-object heap compact.
- **Garbage collector.** Everything built at start (catalog arrays, bundle, states) is moved out of the
  collector's way with `gc.freeze()`, and generation 0 is collected less often, so a Rank rarely pays
  for a collection of objects it did not make.
"""

from __future__ import annotations

import ctypes
import gc
import logging

log = logging.getLogger("appliance.ranker")

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
            "openblas_set_num_threads", "MKL_Set_Num_Threads")


def limit_blas_threads(n: int) -> list[str]:
    """Set the thread count of every BLAS library loaded in this process; returns what was set."""
    done: list[str] = []
    try:
        from threadpoolctl import threadpool_limits  # optional; not a dependency

        threadpool_limits(limits=n, user_api="blas")
        return ["threadpoolctl"]
    except Exception:  # noqa: BLE001 - fall back to calling the libraries directly
        pass
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            paths = {line.split()[-1] for line in fh if len(line.split()) >= 6}
        libs = sorted(p for p in paths if ".so" in p and ("blas" in p.lower() or "mkl" in p.lower()))
    except OSError:
        return done
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done.append(f"{path}:{name}")
                break
    return done


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters


def tune_malloc(mmap_threshold: int = 64 * 1024, arenas: int = 2) -> bool:
    """Fixed mmap threshold and few arenas (glibc only; elsewhere nothing changes). True when applied."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_ARENA_MAX, arenas))
        libc.mallopt(M_TRIM_THRESHOLD, 4 * mmap_threshold)
        return ok
    except (OSError, AttributeError):
        return False


def tune_for_latency(blas_threads: int) -> None:
    import numpy  # noqa: F401 - load BLAS before limiting it

    what = limit_blas_threads(blas_threads)
    log.info("BLAS threads limited to %d (%s); malloc tuned: %s", blas_threads, ", ".join(what) or
             "no BLAS library found", tune_malloc())


def freeze_heap(gen0_threshold: int = 50_000) -> None:
    """Call once start-up is done: what exists now is never scanned again."""
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, g1, g2)
