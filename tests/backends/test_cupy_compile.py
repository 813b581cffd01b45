"""CI: every cupy-backend kernel and template instantiation compiles with NVRTC for sm_80 and
sm_90, with no error and no warning (ptxas register spills included).

Needs only NVRTC (cupy's binding + the nvidia-cuda-nvrtc-cu12 wheel), no GPU and no driver;
skips, saying why, only when NVRTC itself is not installed.
"""

from __future__ import annotations

import pytest

from opbench.backends.cupy import nvrtc, plan

NVRTC_OK, NVRTC_WHY = nvrtc.nvrtc_available()
pytestmark = pytest.mark.skipif(not NVRTC_OK, reason=f"NVRTC not installed: {NVRTC_WHY}")

MODULES = sorted(plan.module_kernels())


@pytest.mark.parametrize("arch", plan.CI_ARCHS)
@pytest.mark.parametrize("file_name", MODULES)
def test_kernels_compile_without_errors_or_warnings(file_name, arch):
    result = nvrtc.compile_module(file_name, arch)
    assert result.ok, f"{file_name} for {arch} failed to compile:\n{result.log}"
    assert not result.warnings, f"{file_name} for {arch} warns:\n{result.log}"
    names = plan.module_kernels()[file_name]
    assert set(result.lowered) == set(names)  # every instantiation exists in the binary
    assert all(result.lowered.values())
    assert result.binary_size > 0


def test_warnings_are_detected():
    """The check above would pass vacuously if NVRTC's warnings went unseen."""
    source = 'extern "C" __global__ void k(float* x) { int unused; }'
    result = nvrtc.compile_source(source, "w.cu", "sm_80", ["k"])
    assert result.ok and result.warnings


def test_errors_are_reported_with_the_log():
    result = nvrtc.compile_source('extern "C" __global__ void k() { undefined_name(); }', "e.cu",
                                  "sm_90", ["k"])
    assert not result.ok and "undefined_name" in result.log


def test_spills_are_warnings():
    """ptxas register spills reach the log as warnings, so a spilling kernel fails above."""
    source = """extern "C" __global__ void k(float* x, int n) {
        float a[32];
        #pragma unroll
        for (int i = 0; i < 32; ++i) a[i] = x[i * n];
        float s = 0.f;
        for (int j = 0; j < n; ++j) {
            #pragma unroll
            for (int i = 0; i < 32; ++i) s += a[i] * x[j + i];
        }
        #pragma unroll
        for (int i = 0; i < 32; ++i) x[i] = a[i] + s;
    }"""
    result = nvrtc.compile_source(source, "s.cu", "sm_80", ["k"],
                                  ("-Xptxas=-warn-spills", "-maxrregcount=24"))
    assert result.ok
    assert any("spilled" in w for w in result.warnings), result.log
