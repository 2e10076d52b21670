"""Run helpers every demo needs: device choice, seeding, a device-synchronised timer, peak memory.

Timing on an accelerator is asynchronous: a kernel launch returns before the kernel finishes, so
``Timer`` synchronises the device before reading the clock. Peak memory is read with the tool that
matches the device: the CUDA caching allocator's counters on a GPU, the resident set size of this
process (sampled on a background thread) on a CPU.
"""

import os
import platform
import random
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda > mps > cpu; an explicit name that is not available raises ValueError."""
    if name not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {name!r}")
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_ok else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch.cuda.is_available() is False")
    if name == "mps" and not mps_ok:
        raise ValueError("device='mps' was requested but torch.backends.mps.is_available() is False")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels to finish; a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Timer:
    """Context manager measuring wall time, synchronising the device on entry and exit.

    >>> with Timer(device) as t: y = model(x)
    >>> t.seconds
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds = float("nan")

    def __enter__(self):
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
        return False


def time_function(fn, device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds over `repeats` runs after `warmup` untimed runs."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        times.append(t.seconds)
    return float(np.median(times))


def _resident_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


@contextmanager
def track_peak_memory(device: torch.device | str):
    """Yield a dict whose 'peak_bytes' is filled in on exit with the peak extra memory used inside.

    cuda: torch.cuda.max_memory_allocated above what was allocated on entry (exact, tensors only).
    cpu: peak resident set size above the entry value, sampled every 0.5 ms (approximate: it sees
    every allocation of the process, and allocations shorter than the sampling period can be missed).
    mps: driver-allocated memory after the block minus before (no peak counter exists).
    """
    device = torch.device(device)
    stats = {"peak_bytes": 0, "method": ""}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield stats
        synchronize(device)
        stats["peak_bytes"] = torch.cuda.max_memory_allocated(device) - start
        stats["method"] = "torch.cuda.max_memory_allocated"
    elif device.type == "mps":
        start = torch.mps.driver_allocated_memory()
        yield stats
        synchronize(device)
        stats["peak_bytes"] = max(0, torch.mps.driver_allocated_memory() - start)
        stats["method"] = "torch.mps.driver_allocated_memory"
    else:
        start = _resident_bytes()
        peak = [start]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _resident_bytes())
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield stats
        finally:
            peak[0] = max(peak[0], _resident_bytes())
            stop.set()
            sampler.join()
        stats["peak_bytes"] = peak[0] - start
        stats["method"] = "process RSS sampled every 0.5 ms"


def describe_device(device: torch.device | str) -> str:
    """Human-readable name of the hardware behind `device`, e.g. 'NVIDIA H100 80GB HBM3' or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"{cpu_model_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux) with its family/model/stepping numbers, which
    identify the generation when a virtual machine reports only e.g. 'AMD EPYC'; else what platform knows."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    numbers = ", ".join(f"{key} {fields[key]}" for key in ("cpu family", "model", "stepping") if key in fields)
    return f"{fields['model name']} ({numbers})" if numbers else fields["model name"]
