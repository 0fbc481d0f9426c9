"""What machine a figure was measured on: CPU model, cores and vector width (Linux /proc/cpuinfo; stdlib only).

Machines of this project's kind come with AVX-512 or AVX2 only, and that changes wall times 2-3x, so every timing
the project prints names it: the run's start line (mpo_online/run/console.py), report.md and summary.json
(mpo_online/run/report.py). The float kernels are pinned to AVX2 on both (mpo_online/__init__.py): the vector width
changes how fast a run is, not what it computes on one CPU vendor (torch side; vLLM's own kernels are not pinned).
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache


@lru_cache(maxsize=1)
def _cpuinfo() -> dict:
    """The first "model name", "vendor_id" and "flags" of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return {k: fields[k] for k in ("model name", "vendor_id", "flags") if k in fields}


@lru_cache(maxsize=1)
def describe_machine() -> dict:
    """{"cpu_model", "cores", "vector": "AVX-512" | "AVX2" | "other", "arch"} of this machine."""
    info = _cpuinfo()
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    return {"cpu_model": model, "cores": os.cpu_count() or 1, "vector": vector, "arch": platform.machine()}


def cpu_vendor() -> str:
    """'GenuineIntel', 'AuthenticAMD', ... ('unknown' without /proc/cpuinfo): MKL picks its kernels by it, so the
    pinned training bits differ between vendors (tests/test_trainer.py records them per vendor)."""
    return _cpuinfo().get("vendor_id", "unknown")


def machine_line(info: dict | None = None) -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores, AVX-512' (for start lines and reports)."""
    m = info or describe_machine()
    return f"{m['cpu_model']}, {m['cores']} cores, {m['vector']}"
