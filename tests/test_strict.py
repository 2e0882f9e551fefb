"""The test suite's own rule for missing pieces: skip on a developer's machine, fail under PACER_TEST_STRICT=1."""

from __future__ import annotations

import pytest

from pacer.model import cpu_kernels
from tests.strict import STRICT_ENV, import_or_skip, kernel_ops, skip_or_fail


@pytest.mark.parametrize(("value", "outcome"), [(None, pytest.skip.Exception), ("0", pytest.skip.Exception),
                                               ("1", pytest.fail.Exception)])
def test_skip_or_fail_follows_the_variable(monkeypatch, value, outcome):
    if value is None:
        monkeypatch.delenv(STRICT_ENV, raising=False)
    else:
        monkeypatch.setenv(STRICT_ENV, value)
    with pytest.raises(outcome, match="wheel missing"):
        skip_or_fail("wheel missing")


def test_a_missing_module_fails_under_strict(monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="could not import 'no_such_module_here'"):
        import_or_skip("no_such_module_here")
    assert import_or_skip("json").dumps([]) == "[]"


def test_kernels_turned_off_on_purpose_skip_even_under_strict(monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")
    monkeypatch.setenv(cpu_kernels.NO_KERNEL_ENV, "1")
    with pytest.raises(pytest.skip.Exception, match=cpu_kernels.NO_KERNEL_ENV):
        kernel_ops(None, "kernels")
    monkeypatch.setenv(cpu_kernels.NO_KERNEL_ENV, "0")
    with pytest.raises(pytest.fail.Exception, match="no compiler"):
        kernel_ops(None, "kernels")
    assert kernel_ops("ops", "kernels") == "ops"
