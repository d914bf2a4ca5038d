"""Background jobs and CUDA-graph captures must not overlap.

A layer's prefill build and page insertions run on a worker thread (``PolicyLayer._run_job``) while the decode
path goes on; an index may capture a CUDA graph on the decode path (the DCI tree's search). PyTorch refuses
host/device copies from pageable memory while a capture is under way, and such a copy from another thread can
invalidate the capture. So a job holds ``capture_lock`` while it runs, and a capture holds it while capturing:
captures are rare (once per table reallocation), so the decode path almost never waits on it. Re-entrant: a
job may itself capture (a selector that searches in ``prepare``).
"""

from __future__ import annotations

import threading

__all__ = ["capture_lock"]

capture_lock = threading.RLock()
