"""Write a demo's measured numbers to results.json together with where and when they were measured.

Every number in a README must say where it came from; results.json carries the device, the torch
version and the date beside the numbers so that a reader can check.
"""

import datetime as _dt
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

from runtime import describe_device


def environment(device: torch.device | str) -> dict:
    """The facts that make a measurement reproducible: hardware, software versions, date, command."""
    return {
        "device": str(torch.device(device)),
        "hardware": describe_device(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
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


def write_results(path: str | Path, results: dict, device: torch.device | str, **metadata) -> Path:
    """Write {"environment": ..., **metadata, "results": results} as JSON, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"environment": environment(device), **_jsonable(metadata), "results": _jsonable(results)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)
    return path
