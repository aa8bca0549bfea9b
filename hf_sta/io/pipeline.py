"""Overlapping reads, math and writes: worker threads that compute tensors side by side, in order, and a pool of
reusable buffers.

A streamed merge reads ``T + 1`` tensors, computes, and writes one, tensor after tensor. Reads (``readinto`` from the
page cache), writes and torch/NumPy kernels all release the GIL, so Python threads run them on several cores at
once: :func:`parallel_map` has ``PIPELINE_WORKERS`` threads each read and merge one tensor, the caller receives each
result as soon as it is ready, and ``StreamingSafetensorsWriter(background=True, any_order=True)`` writes it at its
place in the file meanwhile.
Every tensor's result depends on its inputs only (stochastic kernels seed a generator per tensor), so the output
does not depend on the scheduling.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

__all__ = ["PIPELINE_WORKERS", "BufferPool", "intra_op_threads", "parallel_map", "torch_threads"]

# Tensors computed at the same time by a streamed merge (each reads its inputs and runs the kernel in its own
# thread): two keep both cores of a small machine busy while one of them waits on a read.
PIPELINE_WORKERS = 2

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


def parallel_map(
    function: Callable[[Item], Loaded],
    items: Iterable[Item],
    *,
    workers: int = PIPELINE_WORKERS,
    ordered: bool = True,
) -> Iterator[Loaded]:
    """Yield ``function(item)`` for each item, computed by ``workers`` background threads.

    Like ``Executor.map``, but lazy and bounded: at most ``workers + 1`` items are submitted and not yet yielded, so
    at most ``workers + 2`` results exist at a time. ``ordered=True`` yields in the items' order (a slow item holds
    back the ones after it); ``ordered=False`` yields each result as soon as it is ready, which keeps every worker
    busy. An exception raised by ``function`` is re-raised here; closing the generator early cancels what has not
    started and waits for what has.
    """
    iterator = iter(items)
    pending: collections.deque[Future] = collections.deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hf_sta-worker") as executor:
        try:
            for item in itertools.islice(iterator, workers + 1):
                pending.append(executor.submit(function, item))
            while pending:
                if ordered:
                    done = [pending.popleft()]
                else:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    done = [future for future in pending if future in finished]  # submission order among them
                    for future in done:
                        pending.remove(future)
                for future in done:
                    result = future.result()
                    following = next(iterator, _END)
                    if following is not _END:
                        pending.append(executor.submit(function, following))
                    yield result
                    del result  # the caller is done with it: its buffers may be reused
        finally:
            for future in pending:
                future.cancel()


_END = object()


class BufferPool:
    """Reusable flat buffers, so that tensor after tensor is read into memory that is already mapped.

    On CPU the first touch of freshly allocated memory (the kernel zeroes every new page) costs more than an
    elementwise pass over it. The pool holds as many buffers as were in use at the same time (a few per worker
    thread), each as large as the largest request it served. Buffers are bytes, viewed as the requested dtype.
    Thread-safe.
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []  # uint8 buffers
        self._lent: dict[int, torch.Tensor] = {}  # storage address -> uint8 buffer, for buffers in use
        self._lock = threading.Lock()

    def acquire(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A 1-D ``dtype`` buffer of ``numel`` entries (contents undefined) until :meth:`release`: the smallest free
        buffer that fits, else a new one, which replaces the largest free buffer too small to fit."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            sizes = [buffer.numel() for buffer in self._free]
            fitting = [index for index, size in enumerate(sizes) if size >= nbytes]
            if fitting:
                buffer = self._free.pop(min(fitting, key=sizes.__getitem__))
            else:
                if self._free:
                    self._free.pop(max(range(len(sizes)), key=sizes.__getitem__))
                buffer = torch.empty(-(-nbytes // 8) * 8, dtype=torch.uint8)  # any dtype can view it later
            self._lent[buffer.untyped_storage().data_ptr()] = buffer
        return buffer[:nbytes].view(dtype)

    def release(self, buffer: torch.Tensor) -> None:
        """Give back a buffer from :meth:`acquire` (or any view of it); it must no longer be used."""
        with self._lock:
            self._free.append(self._lent.pop(buffer.untyped_storage().data_ptr()))


@contextlib.contextmanager
def intra_op_threads(workers: int = PIPELINE_WORKERS) -> Iterator[int]:
    """Run the body with torch's intra-op threads set to ``max(1, (n - 1) // workers)`` (``n`` = the current
    setting, restored after): ``workers`` threads run kernels side by side and one core is left to writing.

    Without it every worker's kernel starts an OpenMP team of ``n`` threads; the teams and the I/O threads then
    compete for the same cores, and a team thread that loses its core stalls every elementwise op at the barrier.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (threads - 1) // workers))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``num_threads`` for the body (restored after); ``None`` changes nothing."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
