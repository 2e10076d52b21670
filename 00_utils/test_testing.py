"""Tests for testing.py: a missing reference skips on a learner's machine and fails under CI=true."""

import math

import pytest

from testing import in_ci, missing, require


def test_require_returns_the_module_when_installed():
    assert require("math") is math
    assert require("os.path").join("a", "b").endswith("b")


@pytest.mark.parametrize("ci, outcome", [(None, pytest.skip.Exception), ("false", pytest.skip.Exception),
                                         ("true", pytest.fail.Exception), ("TRUE", pytest.fail.Exception)])
def test_missing_reference_skips_locally_and_fails_under_ci(monkeypatch, ci, outcome):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert in_ci() == (outcome is pytest.fail.Exception)
    with pytest.raises(outcome, match="no_such_reference_module"):
        require("no_such_reference_module")
    with pytest.raises(outcome, match="corpus not present"):
        missing("corpus not present")
