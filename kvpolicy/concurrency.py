"""The background worker of the layer jobs, the lock that keeps jobs and CUDA-graph captures apart, and the
one helper that captures and replays CUDA graphs.

``JobQueue``: one worker thread. A layer's prefill build and page insertions run there
(``PolicyLayer._run_job``) while the decode path goes on. Jobs run first-in first-out, except ranked ones
(``submit_ranked``): when the worker is free it takes an unranked job first, else the ranked job of highest rank
at that moment. Deferred page insertions rank by how far the decode path is from needing them, so that the
worker does not start the job of the very layer the decode path is about to reach (which would then wait for
it, step after step).

``capture_lock``: an index may capture a CUDA graph on the decode path (the DCI tree's search). PyTorch refuses
host/device copies from pageable memory while a capture is under way, and such a copy from another thread can
invalidate the capture. So a job holds ``capture_lock`` while it runs, and a capture holds it while capturing:
captures are rare (once per table reallocation), so the decode path almost never waits on it. Re-entrant: a
job may itself capture (a selector that searches in ``prepare``).

``graph_capture(graph)``: every capture of the library goes through it. Besides ``capture_lock`` it keeps
Python's cyclic garbage collector off while the capture runs: a collection there may free an old CUDA graph
(a released cache's, or a re-captured step's), and destroying a graph frees its memory pool, which CUDA refuses
on a capturing thread ("operation not permitted when stream is capturing"), invalidating the capture.

``GraphCache``: the one place a CUDA graph is captured and replayed (a layer's decode step, the DCI tree's masked
search). It holds one graph with the key it was captured under; a call with another key captures again: a warm-up
run on a side stream (kernel compilation, lazy allocations), then the capture under ``graph_capture``. Inputs are
copied into static buffers (tensors) or written into 0-dim device tensors (Python numbers) before each replay.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future

__all__ = ["GraphCache", "JobQueue", "capture_lock", "graph_capture"]

capture_lock = threading.RLock()


@contextlib.contextmanager
def graph_capture(graph, **kwargs) -> Iterator[None]:
    """``torch.cuda.graph(graph, capture_error_mode="thread_local", **kwargs)`` under ``capture_lock``, with the
    cyclic garbage collector off until the capture ends (module docstring)."""
    import torch

    was_enabled = gc.isenabled()
    with capture_lock:
        gc.disable()  # (torch.cuda.graph still runs its explicit gc.collect() before the capture begins)
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local", **kwargs):
                yield
        finally:
            if was_enabled:
                gc.enable()


class GraphCache:
    """One CUDA graph of ``fn(*inputs)``, captured under ``key`` and replayed while the key holds (module doc).

    ``fn`` reads its inputs only through its arguments (the static buffers) and whatever else the key pins (tables
    updated in place); its output is the graph's output, overwritten by every replay. ``on_capture()``, if given,
    runs on the current stream before the warm-up and may return a callable run after it (e.g. to undo a counter
    that the warm-up must not count)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.key = self.graph = self.output = None
        self._inputs: tuple = ()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def capture(self, key, fn: Callable, *inputs, device=None, on_capture: Callable | None = None) -> None:
        import torch

        self.clear()
        if device is None:
            device = next(x.device for x in inputs if isinstance(x, torch.Tensor))
        # numbers become 0-dim device tensors by a fill (no host-to-device copy)
        static = tuple(x.clone() if isinstance(x, torch.Tensor) else torch.full((), x, device=device) for x in inputs)
        after = on_capture() if on_capture is not None else None
        main = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(main)
        with torch.cuda.stream(side):  # warm-up outside the graph
            fn(*static)
        main.wait_stream(side)
        if after is not None:
            after()
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph):  # no job meanwhile
            out = fn(*static)
        self.key, self.graph, self._inputs, self.output = key, graph, static, out

    def replay(self, key, fn: Callable, *inputs, device=None, on_capture: Callable | None = None):
        """``fn(*inputs)`` by a replay of its graph (captured first if there is none for ``key``) -> its output."""
        if self.graph is None or self.key != key:
            self.capture(key, fn, *inputs, device=device, on_capture=on_capture)
        for buf, x in zip(self._inputs, inputs):
            buf.fill_(x) if isinstance(x, (int, float)) else buf.copy_(x)
        self.graph.replay()
        return self.output


class JobQueue(Executor):
    """A single worker thread; FIFO for ``submit``, highest current rank for ``submit_ranked`` (module doc)."""

    def __init__(self, name: str = "kvpolicy-jobs"):
        self._name = name
        self._cond = threading.Condition()
        self._jobs: list[tuple[int, Callable[[], float] | None, Future, Callable, tuple]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._shutdown = False

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self._put(None, fn, args, kwargs)

    def submit_ranked(self, rank: Callable[[], float], fn, /, *args, **kwargs) -> Future:
        """Queue ``fn(*args)``; ``rank()`` is read whenever the worker chooses its next job."""
        return self._put(rank, fn, args, kwargs)

    def _put(self, rank, fn, args, kwargs) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot submit to a JobQueue after shutdown")
            self._jobs.append((next(self._seq), rank, fut, fn, (args, kwargs)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return fut

    def _take(self):
        unranked = [j for j in self._jobs if j[1] is None]
        if unranked:
            job = min(unranked, key=lambda j: j[0])
        else:
            job = max(self._jobs, key=lambda j: (j[1](), -j[0]))
        self._jobs.remove(job)
        return job

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._shutdown:
                    self._cond.wait()
                if not self._jobs:
                    return
                _, _, fut, fn, (args, kwargs) = self._take()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 (handed to whoever joins the job)
                fut.set_exception(e)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                for job in self._jobs:
                    job[2].cancel()
                self._jobs.clear()
            self._cond.notify_all()
            thread = self._thread
        if wait and thread is not None:
            thread.join()
