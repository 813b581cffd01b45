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


def _longest_load_runs(ptx: str) -> tuple[int, int]:
    """(global loads, 16-byte global loads) issued in a row with no shared-memory store
    between them, at most, in the code between the kernel's first two barriers."""
    staging = ptx.split("bar.sync")[1]
    longest = longest_wide = run = wide = 0
    for line in staging.splitlines():
        if "st.shared" in line:
            run = wide = 0
        elif "ld.global" in line:
            run, wide = run + 1, wide + (".v4." in line)
            longest, longest_wide = max(longest, run), max(longest_wide, wide)
    return longest, longest_wide


@pytest.mark.parametrize("name", ["attn_fwd<f16_t, 16>", "attn_fwd<float, 16>"])
def test_attention_stages_a_tile_with_several_loads_in_flight(name):
    """A K/V tile's staging issues several 16-byte loads (and, for unaligned rows, several
    one-element loads) before it stores any to shared memory: a loop that stored each loaded
    element before the next load waited one memory latency per element (decode ran at ~40
    GB/s on an H200)."""
    loads, wide_loads = _longest_load_runs(nvrtc.kernel_ptx("attention.cu", name))
    assert wide_loads >= 4 and loads >= 8, (loads, wide_loads)
