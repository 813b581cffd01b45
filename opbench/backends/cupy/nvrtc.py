"""Compiling the kernels with NVRTC alone: no GPU, no driver, no CUDA toolkit headers.

CuPy's thin NVRTC binding (``cupy_backends.cuda.libs.nvrtc``) loads libnvrtc from the
nvidia-cuda-nvrtc-cu12 wheel (through cuda-pathfinder) without touching the driver, so CI can
compile every kernel and every template instantiation for each target architecture.
The runtime compiles the same sources through ``cupy.RawModule`` with the same options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import plan

WARNING = re.compile(r"\bwarning\b", re.IGNORECASE)


@dataclass(frozen=True)
class CompileResult:
    file_name: str
    arch: str
    ok: bool
    log: str
    lowered: dict[str, str]  # name expression -> mangled name
    binary_size: int
    ptx: str = ""  # what the compiler made of the loops, before ptxas

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.log.splitlines() if WARNING.search(line)]


def nvrtc_available() -> tuple[bool, str]:
    """(True, version) or (False, why NVRTC cannot be used here)."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        return False, f"cupy is not installed ({exc}): pip install 'opbench[cupy]'"
    try:
        major, minor = nvrtc.getVersion()
    except Exception as exc:  # the binding imports, but libnvrtc.so cannot be loaded
        return False, f"libnvrtc cannot be loaded ({exc}): pip install nvidia-cuda-nvrtc-cu12"
    return True, f"NVRTC {major}.{minor}"


def compile_source(source: str, file_name: str, arch: str, names: list[str],
                   extra_options: tuple[str, ...] = ()) -> CompileResult:
    """Compile source to a cubin for arch (e.g. "sm_90"), instantiating every name expression.
    Never raises on a compile error: the result carries ok=False and NVRTC's log."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, file_name, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        options = [f"--gpu-architecture={arch}", *plan.COMPILE_OPTIONS, *extra_options]
        try:
            nvrtc.compileProgram(prog, options)
            ok = True
        except nvrtc.NVRTCError:
            ok = False
        log = nvrtc.getProgramLog(prog)
        if not ok:
            return CompileResult(file_name, arch, False, log, {}, 0)
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
        ptx = nvrtc.getPTX(prog)
        return CompileResult(file_name, arch, True, log, lowered, len(nvrtc.getCUBIN(prog)),
                             ptx.decode() if isinstance(ptx, bytes) else ptx)
    finally:
        nvrtc.destroyProgram(prog)


def compile_module(file_name: str, arch: str) -> CompileResult:
    """One kernels/*.cu file with all the instantiations the backend launches."""
    names = plan.module_kernels()[file_name]
    # -Xptxas -warn-spills: a register spill in a hot kernel is reported as a warning too
    return compile_source(plan.load_source(file_name), file_name, arch, names,
                          ("-Xptxas=-warn-spills",))


def kernel_ptx(file_name: str, name: str, arch: str = "sm_90") -> str:
    """The PTX of one kernel instantiation of a kernels/*.cu file (``name`` as launched, e.g.
    ``attn_fwd<f16_t, 16>``): what the compiler made of its loops, readable without a GPU.
    Raises RuntimeError with NVRTC's log if the file does not compile."""
    result = compile_source(plan.load_source(file_name), file_name, arch, [name])
    if not result.ok:
        raise RuntimeError(f"{file_name} for {arch}: {result.log}")
    body = result.ptx[result.ptx.index(f".entry {result.lowered[name]}("):]
    return body[:body.index("\n}\n") + 3]
