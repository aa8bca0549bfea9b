"""Tests for hf_sta.io.pipeline (ordered worker threads, buffer pool, intra-op threads) and the background
safetensors writer."""

from __future__ import annotations

import functools
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from hf_sta.io.checkpoints import StreamingSafetensorsWriter, TensorPlan
from hf_sta.io.pipeline import BufferPool, intra_op_threads, parallel_map


def _threads(prefix: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(prefix)]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parallel_map_keeps_order_and_bounds_the_lookahead(workers):
    started: list[int] = []
    lock = threading.Lock()

    def function(item: int) -> int:
        with lock:
            started.append(item)
        time.sleep(0.001 * (item % 3))  # finish out of order
        return item * 10

    seen = []
    for value in parallel_map(function, range(12), workers=workers):
        seen.append(value)
        # While item i is in the caller's hands, at most `workers + 1` later items have been submitted.
        assert max(started) <= value // 10 + workers + 1
    assert seen == [10 * i for i in range(12)] and sorted(started) == list(range(12))
    assert list(parallel_map(function, [], workers=workers)) == []


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_unordered_parallel_map_yields_everything_as_it_is_ready(workers):
    release = threading.Event()
    started: list[int] = []

    def function(item: int) -> int:
        started.append(item)
        if item == 0:
            release.wait(5)  # the first item is slow: the others overtake it
        return item

    if workers == 1:
        release.set()  # a single worker cannot overtake
    seen = []
    for value in parallel_map(function, range(12), workers=workers, ordered=False):
        seen.append(value)
        assert len(started) - len(seen) <= workers + 1  # never more than workers + 1 submitted and not yielded
        if len(seen) == 2:
            release.set()
    assert sorted(seen) == list(range(12))
    if workers > 1:
        assert seen[0] != 0  # a later item came out first


def test_parallel_map_reraises_at_the_failing_item_and_stops_the_threads():
    def function(item: int) -> int:
        if item == 3:
            raise OSError("unreadable shard")
        return item

    received = []
    with pytest.raises(OSError, match="unreadable shard"):
        for value in parallel_map(function, range(10)):
            received.append(value)
    assert received == [0, 1, 2]
    assert not _threads("hf_sta-worker")


def test_parallel_map_closed_early_leaves_no_thread():
    release = threading.Event()

    def function(item: int) -> int:
        if item == 1:
            release.wait(5)
        return item

    iterator = parallel_map(function, range(50))
    assert next(iterator) == 0  # item 1 is now running in the background
    release.set()
    iterator.close()
    assert not _threads("hf_sta-worker")


def test_buffer_pool_reuses_memory():
    pool = BufferPool()
    a = pool.acquire(1000)
    b = pool.acquire(10)
    assert a.numel() == 1000 and b.numel() == 10 and a.dtype == torch.float32
    pointers = {a.data_ptr(), b.data_ptr()}
    pool.release(a.view(10, 100))  # any view of the buffer
    pool.release(b)
    # Alternating requests (two workers hold a buffer each) are served from the same two allocations.
    for numel in (500, 8, 1000, 10, 999, 3):
        buffer = pool.acquire(numel)
        assert buffer.numel() == numel and buffer.data_ptr() in pointers
        other = pool.acquire(7)
        assert other.data_ptr() in pointers and other.data_ptr() != buffer.data_ptr()
        pool.release(buffer)
        pool.release(other)
    # A request larger than every free buffer replaces the largest one: the pool never grows past two buffers.
    big = pool.acquire(5000)
    assert big.data_ptr() not in pointers
    pool.release(big)
    assert sorted(buffer.numel() for buffer in pool._free) == [40, 20000]  # bytes
    # Buffers are bytes: a bfloat16 or int64 request reuses them too, correctly typed and sized.
    half = pool.acquire(6, torch.bfloat16)
    wide = pool.acquire(3, torch.int64)
    assert (half.dtype, half.numel(), wide.dtype, wide.numel()) == (torch.bfloat16, 6, torch.int64, 3)
    assert {half.data_ptr(), wide.data_ptr()} <= {buffer.data_ptr() for buffer in (big, b)}


@pytest.mark.parametrize("workers", [1, 2])
def test_intra_op_threads_are_restored(workers):
    threads = torch.get_num_threads()
    with intra_op_threads(workers) as inside:
        assert inside == torch.get_num_threads() == max(1, (threads - 1) // workers)
    assert torch.get_num_threads() == threads
    with pytest.raises(RuntimeError, match="boom"), intra_op_threads(workers):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == threads


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(64, 32 + i, generator=generator) for i in range(12)}


@pytest.mark.parametrize("budget", ["1GB", 20_000])
def test_background_writer_writes_the_same_bytes(tmp_path, budget):
    tensors = _tensors()
    plan = [TensorPlan(k, v.shape, v.dtype) for k, v in tensors.items()]
    for background in (False, True):
        folder = tmp_path / str(background)
        folder.mkdir()
        writer = StreamingSafetensorsWriter(folder, plan, max_shard_size=budget, background=background)
        written: list[str] = []
        for key, value in tensors.items():
            writer.write(key, value, on_written=functools.partial(written.append, key))
        writer.finish()
        writer.abort()
        assert written == list(tensors)  # each callback once its tensor is in the file
    files = sorted(path.name for path in (tmp_path / "False").iterdir())
    assert files == sorted(path.name for path in (tmp_path / "True").iterdir())
    assert (len(files) > 1) == (budget != "1GB")
    for name in files:
        assert (tmp_path / "False" / name).read_bytes() == (tmp_path / "True" / name).read_bytes()
    loaded = {}
    for name in files:
        if name.endswith(".safetensors"):
            loaded.update(load_file(tmp_path / "True" / name))
    assert all(torch.equal(loaded[key], value) for key, value in tensors.items())
    assert not _threads("hf_sta-write")


def test_background_write_error_reaches_the_caller(tmp_path, monkeypatch):
    tensors = _tensors()
    plan = [TensorPlan(k, v.shape, v.dtype) for k, v in tensors.items()]
    calls = {"n": 0}
    original = StreamingSafetensorsWriter._write_bytes

    def failing(self, shard, offset, data, on_written=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        original(self, shard, offset, data, on_written)

    monkeypatch.setattr(StreamingSafetensorsWriter, "_write_bytes", failing)
    writer = StreamingSafetensorsWriter(tmp_path, plan, background=True)
    with pytest.raises(OSError, match="disk full"):
        for key, value in tensors.items():
            writer.write(key, value)
        writer.finish()
    writer.abort()
    assert calls["n"] == 3  # nothing written after the failure
    assert not _threads("hf_sta-write")


def test_an_interrupted_background_writer_stops_before_the_interrupt_propagates(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM (here a SIGALRM handler raising KeyboardInterrupt) while ``abort`` waits for a slow write:
    the write in progress completes, the queued ones are skipped, and the thread has ended when the interrupt
    reaches the caller (an interrupted ``Thread.join`` returned at once and left the thread running)."""
    tensors = _tensors()
    plan = [TensorPlan(k, v.shape, v.dtype) for k, v in tensors.items()]
    writes: list[str] = []
    original = StreamingSafetensorsWriter._write_bytes

    def slow(self, shard, offset, data, on_written=None):
        time.sleep(0.6 if not writes else 0)
        original(self, shard, offset, data, on_written)
        writes.append("done")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(StreamingSafetensorsWriter, "_write_bytes", slow)
    writer = StreamingSafetensorsWriter(tmp_path, plan, background=True, any_order=True)
    for key, value in list(tensors.items())[:4]:
        writer.write(key, value)
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            writer.abort()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert writes == ["done"]  # the interrupt reached the caller only once the write in progress was done
    for thread in _threads("hf_sta-write"):
        thread.join(timeout=5)
    assert writes == ["done"] and not _threads("hf_sta-write")  # the three queued behind it were dropped


def test_background_writer_queues_behind_a_slow_write_up_to_a_byte_budget(tmp_path, monkeypatch):
    tensors = _tensors()  # 12 tensors of 8-11 KB
    plan = [TensorPlan(k, v.shape, v.dtype) for k, v in tensors.items()]
    release = threading.Event()
    original = StreamingSafetensorsWriter._write_bytes

    def slow_first(self, shard, offset, data, on_written=None):
        if offset == len(self._headers[0]):  # the first tensor's bytes: hold the writer until released
            release.wait(timeout=30)
        original(self, shard, offset, data, on_written)

    monkeypatch.setattr(StreamingSafetensorsWriter, "_write_bytes", slow_first)
    writer = StreamingSafetensorsWriter(tmp_path, plan, background=True, max_queued_bytes=30_000)
    items = list(tensors.items())
    writer.write(*items[0])
    queued = threading.Event()
    done = []

    def feed():
        for key, value in items[1:]:
            writer.write(key, value)
            done.append(key)
        queued.set()

    feeder = threading.Thread(target=feed)
    feeder.start()
    time.sleep(0.5)
    # While the first tensor is being written, the caller queued tensors until 30 KB waited behind it, no more.
    assert 3 <= len(done) <= 4 and not queued.is_set()
    assert sum(tensors[key].numel() * 4 for key in done[:-1]) < 30_000
    release.set()
    feeder.join(timeout=30)
    assert queued.is_set()
    writer.finish()
    writer.abort()
    assert load_file(tmp_path / "model.safetensors").keys() == tensors.keys()
