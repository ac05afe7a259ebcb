"""The runnable examples under examples/ do what their docstrings say."""

import runpy

import pytest

from support.common import REPO

EXAMPLES = REPO / "examples"


@pytest.mark.slow
def test_custom_compression_callback_filters_every_step_and_observes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runpy.run_path(str(EXAMPLES / "custom_compression_callback.py"))["main"]()
    assert result["widths"]["0"] == 32, "the protected layer keeps all its channels"
    assert result["widths"]["3"] < 32, "the other layer was pruned"
    assert len(result["removed"]) == 2 and all(count > 0 for count in result["removed"])
    assert sum(result["removed"]) == 32 - result["widths"]["3"]
