"""pytest set-up for the whole repository: make every topic folder importable and find the corpus.

Every NN_topic folder goes on sys.path through 00_utils/lab_paths.py, the same mechanism the demos
use. When ../shared/data/tinyshakespeare.txt exists beside the checkout (as in CI) and LLM_LAB_DATA
is not set, tests use that copy instead of downloading; without it the Shakespeare tests skip (fail under CI=true).
Tests import optional references with ``testing.require("tiktoken")`` (00_utils/testing.py): a skip
on a learner's machine, a failure under CI=true.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "00_utils"))
import lab_paths  # noqa: E402,F401

_shared_data = ROOT.parent / "shared" / "data"
if "LLM_LAB_DATA" not in os.environ and (_shared_data / "tinyshakespeare.txt").is_file():
    os.environ["LLM_LAB_DATA"] = str(_shared_data)
# Passive OpenMP waiting (as run_all does for demos): on busy or shared cores, spinning torch threads made
# tiny forwards tens of times slower. It must be set before torch starts its thread pool, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
