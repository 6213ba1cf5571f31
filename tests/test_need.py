"""``need``: a missing dependency skips a test on a developer's machine and fails it under CI."""

from __future__ import annotations

import conftest
import pytest


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("TRUE", True), ("", False), ("false", False)])
def test_ci_is_read_from_the_environment(value, expected):
    assert conftest.in_ci({"CI": value}) is expected
    assert conftest.in_ci({}) is False


def test_missing_dependency_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="needs chromium, which is missing"):
        conftest.need(False, "chromium", "apt-get install chromium")
    with pytest.raises(pytest.skip.Exception):
        conftest.need_module("danqing_no_such_module", "nowhere")
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="under CI=true a missing dependency is a failure"):
        conftest.need(False, "chromium", "apt-get install chromium")
    with pytest.raises(pytest.fail.Exception):
        conftest.need_module("danqing_no_such_module", "nowhere")
    conftest.need(True, "chromium", "apt-get install chromium")  # present: nothing happens
    assert conftest.need_module("json", "stdlib").dumps([1]) == "[1]"
