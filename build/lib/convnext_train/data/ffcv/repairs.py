"""Repairs of FFCV 1.0.2: two patched in place on FFCV's classes when this module is imported (so
whenever the package is), namely how its memory manager compiles the reader and which code its
compiler builds with fast-math; and a Loader whose decoding thread's errors reach the consumer.
"""

from __future__ import annotations

import contextlib
import queue

import numpy as np

from convnext_train.data.ffcv.library import (
    FFCV_IMPORT_ERROR,
    Compiler,
    EpochIterator,
    Loader,
    OSCacheManager,
    numba,
)

__all__ = [
    "CheckedEpochIterator",
    "CheckedLoader",
    "compile_reader_keeping_numba_types",
    "compile_with_exact_math",
]


def compile_reader_keeping_numba_types(self):
    """`OSCacheManager.compile_reader` without its explicit signature. Building that signature (its
    `state_type`) sets `mutable = False` on numba's interned `uint8[::1]` type in place, which changes
    the hash of a type that compiled functions are keyed by: after a second Loader is built, numba
    fails with a KeyError inside code compiled for the first (in FFCV's thread, see below). Compiled
    on its first call instead, for the types it is called with: a read-only memory map and two tables."""

    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address : address + size]

    return Compiler.compile(read)


def compile_with_exact_math(cls, code, signature=None):
    """FFCV's `Compiler.compile`, without fast-math for code marked `exact_math` (our decoder). FFCV
    compiles every pipeline stage with fastmath=True, and numba compiles what a stage calls under the
    stage's flags: RandAugment's float arithmetic then got fused multiply-adds and came out a grey
    level away from PIL's on some pixels (and `op_argument` gave 0.1666 as 0.16660000000000003)."""
    if not getattr(code, "exact_math", False):
        return _ffcv_compile(cls, code, signature)
    parallel = getattr(code, "is_parallel", False) and cls.num_threads > 1
    return numba.njit(signature, nogil=True, error_model="numpy", parallel=parallel)(code)


if FFCV_IMPORT_ERROR is None:
    OSCacheManager.compile_reader = compile_reader_keeping_numba_types
    _ffcv_compile = Compiler.compile.__func__
    Compiler.compile = classmethod(compile_with_exact_math)


class CheckedEpochIterator(EpochIterator):
    """FFCV's pass over one epoch, except that an error in its decoding thread reaches the consumer:
    FFCV's thread dies with it and the consumer waits forever for the next batch."""

    error: BaseException | None = None

    def run(self):
        try:
            super().run()
        except BaseException as error:  # noqa: BLE001 - handed over to the consumer, raised there
            self.error = error
            while not self.terminate_event.is_set():
                with contextlib.suppress(queue.Full):
                    self.output_queue.put(None, timeout=0.5)
                    return

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self.error is not None:
                raise RuntimeError(f"FFCV's decoding thread failed: {self.error!r}") from self.error
            raise


class CheckedLoader(Loader):
    """FFCV's Loader making `CheckedEpochIterator`s. The order object gives the whole pass (our
    epoch and start position; FFCV's own epoch counter is not used)."""

    def __iter__(self):
        Compiler.set_num_threads(self.num_workers)
        return CheckedEpochIterator(self, self.traversal_order.sample_order(self.next_epoch))
