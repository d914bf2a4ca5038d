"""What a layer's pinned CPU pool costs to allocate (the TTST suspect): fresh pinned allocation, the same size
again from torch's host cache, the zero fill, and pageable memory registered with CUDA afterwards. Usage:
python benchmarks/probe_pinned_alloc.py OUT.json"""

from __future__ import annotations

import json
import sys
import time

import torch


class Timer:
    """Device-synchronised wall time of a block: ``with Timer() as t: ...; t.s``."""

    def __enter__(self) -> Timer:
        torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.s = time.perf_counter() - self.t0


def probe(mb: int) -> dict:
    n = mb * 2**20
    cudart = torch.cuda.cudart()
    with Timer() as fresh:
        a = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    with Timer() as fill:
        a.fill_(0)
    del a
    with Timer() as cached:
        b = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    del b
    with Timer() as page:
        c = torch.empty(n, dtype=torch.uint8)
    with Timer() as pfill:
        c.fill_(0)
    with Timer() as reg:
        cudart.cudaHostRegister(c.data_ptr(), n, 0)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    with Timer() as h2d:
        dev.copy_(c, non_blocking=True)
    cudart.cudaHostUnregister(c.data_ptr())
    return {"mb": mb, "pinned_fresh_s": fresh.s, "pinned_fill_s": fill.s, "pinned_cached_s": cached.s,
            "pageable_alloc_s": page.s, "pageable_fill_s": pfill.s, "host_register_s": reg.s,
            "h2d_registered_gbps": n / h2d.s / 1e9}


def main(out_path: str) -> None:
    rows = []
    for mb in (45, 170, 537):
        rows.append(probe(mb))
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
    with open(out_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
