"""Write a demo's measured numbers to results.json together with where and when they were measured.

Every number in a README must say where it came from; results.json carries, beside the numbers:
the device and CPU, the software versions, the git commit (and whether tracked files had uncommitted
changes), the thread settings that change speed, and the 1-minute load average at the start and end
of the run, so that a reader can see whether the cores were shared while timings were taken.
"""

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from runtime import cpu_model_name, describe_device

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEED_ENVIRONMENT_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, averaged); None where the OS does not report it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


LOAD_AT_IMPORT = load_average()  # a demo imports this module as it starts: the load when the run began


def git_state(root: Path = REPO_ROOT) -> dict:
    """{"git_commit": HEAD's hash, "git_dirty": tracked files differ from it}; None values outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


def environment(device: torch.device | str, load_at_start: float | None = None) -> dict:
    """The facts that make a measurement reproducible: hardware, software, threads, load, commit, date, command.

    load_at_start defaults to the load average when this module was imported (the start of a demo).
    """
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cores = os.cpu_count()
    return {
        "device": str(torch.device(device)),
        "hardware": describe_device(device),
        "cpu": cpu_model_name(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "environment_variables": {name: os.environ.get(name) for name in SPEED_ENVIRONMENT_VARIABLES},
        "load_average_1min": {"start": LOAD_AT_IMPORT if load_at_start is None else load_at_start,
                              "end": load_average()},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **git_state(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def _jsonable(value):
    """Convert tensors, numpy values and non-finite floats into plain JSON (NaN/inf become strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if hasattr(value, "tolist"):  # numpy array or scalar: tolist() gives a list or a plain number
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(path: str | Path, results: dict, device: torch.device | str, *,
                  load_at_start: float | None = None, **metadata) -> Path:
    """Write {"environment": ..., **metadata, "results": results} as JSON, atomically; returns the path.

    load_at_start: the 1-minute load average when the run began (default: when this module was imported).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"environment": environment(device, load_at_start), **_jsonable(metadata), "results": _jsonable(results)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)
    return path
