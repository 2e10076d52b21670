"""Smoke-run every topic's `demo.py --quick` in a subprocess with a temporary --out.

Topics are discovered from the folders, so a new topic is covered without editing this file.
Each demo must exit 0, write results.json with an environment block, and write at least one PNG.
"""

import json
import os
import subprocess
import sys

import pytest

from run_all import demo_scripts

SCRIPTS = demo_scripts()


def test_at_least_one_demo_is_found():
    assert SCRIPTS, "no NN_topic/demo.py found: the smoke tests would run nothing"


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.parent.name for s in SCRIPTS])
def test_demo_quick_runs(script, tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1",
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}  # see run_all.run_demo
    completed = subprocess.run([sys.executable, str(script), "--quick", "--device", "cpu", "--out", str(tmp_path)],
                               cwd=script.parent, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, f"{script} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["environment"]["torch"] and results["quick"] is True
    assert list((tmp_path / "figures").glob("*.png")), "the demo wrote no figure"
