"""Make every topic folder importable: the one import mechanism of LLM Lab.

Topic folders start with a digit (``04_transformer_block``), so they cannot be Python packages.
Instead every folder ``NN_topic`` is put on ``sys.path`` and each core module has a name that is
unique across the repository (``bpe``, ``attention``, ``transformer`` ...). A demo starts with

    import pathlib, sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
    import lab_paths  # noqa: F401  (puts every NN_topic folder on sys.path)

and can then write ``from transformer import MiniFormer`` or ``from training import train``.
The imports after these lines need no ``# noqa: E402``: pyproject.toml exempts every demo.py.
The root ``conftest.py`` imports this module for pytest. Folders are appended, so the running
script's own folder (``sys.path[0]``) always wins.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPIC_DIRS = sorted(p for p in ROOT.glob("[0-9][0-9]_*") if p.is_dir())

for _folder in TOPIC_DIRS:
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))
