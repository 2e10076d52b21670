"""The reading-order rule: a core module imports only 00_utils, earlier topics, the standard library and
third-party packages, never a later topic (so a learner never meets a name not yet taught).

Core modules are the .py files of each NN_topic folder other than tests (test_*.py, conftest.py) and
demos (demo.py, which may use 04's lab model as a test bench). The module -> topic map is built from
the folders, so a new topic is checked without editing this file.
"""

import ast
from pathlib import Path

import pytest

from lab_paths import TOPIC_DIRS


def topic_number(folder: Path) -> int:
    return int(folder.name[:2])


def is_core_module(path: Path) -> bool:
    return path.suffix == ".py" and not path.name.startswith("test_") and path.name not in ("demo.py", "conftest.py")


def core_module_paths(topic_dirs=TOPIC_DIRS) -> list[Path]:
    return [path for folder in topic_dirs for path in sorted(folder.glob("*.py")) if is_core_module(path)]


def core_modules(topic_dirs=TOPIC_DIRS) -> dict[str, Path]:
    """{module name: path} for every core module (the first folder wins, as on sys.path)."""
    modules = {}
    for path in core_module_paths(topic_dirs):
        modules.setdefault(path.stem, path)
    return modules


def imported_names(source: str) -> set[str]:
    """Top-level names of every absolute import in the source, including imports inside functions."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def later_topic_imports(path: Path, module_topics: dict[str, int]) -> list[str]:
    """'module (topic NN)' for each import of `path` that belongs to a topic after the one holding `path`."""
    own_topic = topic_number(path.parent)
    return sorted(f"{name} (topic {module_topics[name]:02d})" for name in imported_names(path.read_text())
                  if module_topics.get(name, -1) > own_topic)


MODULES = core_modules()
MODULE_TOPICS = {name: topic_number(path.parent) for name, path in MODULES.items()}


def test_core_module_names_are_unique():
    # Every topic folder is on sys.path, so a second module of the same name could never be imported.
    paths = core_module_paths()
    names = [path.stem for path in paths]
    duplicates = sorted(str(path) for path in paths if names.count(path.stem) > 1)
    assert not duplicates, f"module names used twice: {duplicates}"


def test_core_modules_are_found_in_every_topic_with_code():
    topics_with_modules = {topic_number(path.parent) for path in MODULES.values()}
    assert {0, 1, 2, 3} <= topics_with_modules, topics_with_modules
    assert "data" in MODULES and "attention" in MODULES


@pytest.mark.parametrize("name", sorted(MODULES), ids=lambda name: f"{MODULES[name].parent.name}/{name}")
def test_core_module_imports_no_later_topic(name):
    path = MODULES[name]
    assert later_topic_imports(path, MODULE_TOPICS) == [], (
        f"{path.relative_to(path.parents[1])} imports a later topic: core modules may import only 00_utils and "
        f"earlier topics (offer a seam that the later topic plugs into instead)")


def test_the_check_catches_a_later_topic_import(tmp_path):
    early, late = tmp_path / "02_early", tmp_path / "05_late"
    early.mkdir()
    late.mkdir()
    (late / "advanced.py").write_text("X = 1\n")
    (early / "basic.py").write_text("import torch\nimport os.path\n\ndef f():\n    from advanced import X\n    return X\n")
    (early / "demo.py").write_text("import advanced\n")  # demos are exempt
    (early / "test_basic.py").write_text("import advanced\n")  # so are tests
    modules = core_modules([early, late])
    assert sorted(modules) == ["advanced", "basic"]
    topics = {name: topic_number(path.parent) for name, path in modules.items()}
    assert later_topic_imports(modules["basic"], topics) == ["advanced (topic 05)"]
    assert later_topic_imports(modules["advanced"], topics) == []
