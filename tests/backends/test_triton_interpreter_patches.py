"""Triton's interpreter patched once per launch: the bookkeeping with stand-ins, then the real
interpreter running our kernels and Triton's own helpers."""

from __future__ import annotations

import types

import numpy as np
import pytest

from opbench.backends.triton.interpreter_patches import OncePerLaunch
from opbench.harness.ops import SPECS
from opbench.harness.runner import run_case
from opbench.harness.triton_testing import require_triton

LANG, CORE = types.ModuleType("lang"), types.ModuleType("core")


def _function_seeing(*modules):
    """A function whose globals hold ``modules`` (as a kernel's module holds ``tl``)."""
    namespace = {f"m{i}": module for i, module in enumerate(modules)}
    exec("def fn():\n    pass", namespace)
    return namespace["fn"]


class _Scope:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def restore(self):
        self.log.append(("restore", self.name))


@pytest.fixture
def patcher():
    log = []

    def patch_lang(fn):
        log.append(("patch", fn))
        return _Scope(log, fn)

    return OncePerLaunch(patch_lang, (LANG, CORE)), log


def test_a_helper_that_sees_only_patched_modules_is_not_patched_again(patcher):
    once, log = patcher
    kernel, helper = _function_seeing(LANG), _function_seeing(LANG, np)
    launch = once(kernel)
    once(helper).restore()
    once(helper).restore()
    assert log == [("patch", kernel)] and once.skipped == 2
    launch.restore()
    assert log[-1] == ("restore", kernel)


def test_a_helper_that_sees_another_module_is_patched_once_per_launch(patcher):
    once, log = patcher
    kernel, core_helper = _function_seeing(LANG), _function_seeing(CORE)
    for _ in range(2):  # two launches: the patch made in the first does not carry over
        launch = once(kernel)
        once(core_helper)
        once(core_helper)
        launch.restore()
    patches = [fn for kind, fn in log if kind == "patch"]
    assert patches == [kernel, core_helper] * 2


def test_a_launch_that_fails_to_patch_leaves_no_launch_open(patcher):
    once, _ = patcher

    def refuses(fn):  # as Triton's does for a kernel that cannot see triton.language
        raise AssertionError("triton.language must be visible")

    once.patch_lang = refuses
    with pytest.raises(AssertionError):
        once(_function_seeing(LANG))
    assert once.patched is None


@pytest.fixture
def interpreter():
    require_triton()
    from opbench.backends.triton import TritonBackend

    backend = TritonBackend(mode="interpreter")
    yield backend
    backend.close()


def test_the_interpreter_runs_every_op_with_the_wrapper_and_restores_the_language(interpreter):
    import triton.language as tl
    from triton.runtime import interpreter as triton_interpreter

    once = triton_interpreter._patch_lang
    assert isinstance(once, OncePerLaunch)
    skipped = once.skipped
    for op in ("ROPE", "ATTN", "KV_ROTATE", "SET_ROWS", "GET_ROWS", "CPY"):
        case = next(c for c in SPECS[op].cases() if c.dtype == "f32")
        record = run_case(interpreter, case, run_id="patches")
        assert record["status"] == "OK", (case.id, record.get("errors"))
    assert once.skipped > skipped  # helpers were called and not patched again
    assert once.patched is None  # every launch ended
    assert tl.core.is_builtin(tl.arange)  # Triton's own functions are back after the launches
