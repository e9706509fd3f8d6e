"""The machine a benchmark ran on, printed with every result (ratios only mean something next to it), and a
sampler of this process's peak resident memory (Linux ``/proc``)."""

from __future__ import annotations

import os
import platform
import resource
import threading
from typing import Any

import torch


def describe_machine() -> dict[str, Any]:
    """Platform, processor, CPU count, torch version and threads, and the load average now (1, 5, 15 min)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def resident_mb() -> float:
    """Current resident memory of this process in MB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


class PeakResidentMemory(threading.Thread):
    """Samples the resident memory every ``interval_s`` until :meth:`stop`; keeps the peak.

    Use as a context manager: ``with PeakResidentMemory() as peak: ...`` then ``peak.increase_mb``.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.before_mb = resident_mb()
        self.peak_mb = self.before_mb
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, resident_mb())

    def stop(self) -> float:
        """Stop sampling; return the peak resident memory in MB."""
        self._done.set()
        self.join()
        self.peak_mb = max(self.peak_mb, resident_mb())
        return self.peak_mb

    @property
    def increase_mb(self) -> float:
        """Peak minus the resident memory when the sampler was made."""
        return self.peak_mb - self.before_mb

    def __enter__(self) -> PeakResidentMemory:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
