"""Compiling the cupy backend's .cu sources with the host C++ compiler for the CPU emulator.

The source is exactly what NVRTC compiles (``plan.load_source``) with two host-side edits:
``OPB_EMULATE`` is defined (the few PTX ``asm`` lines have host twins under it) and each
``extern __shared__ T name[];`` becomes a pointer to the launch's dynamic shared memory.  For
every name expression the module may launch, an ``extern "C"`` launcher and a parameter-size
query are generated; template deduction on the kernel's address unpacks the argument buffer,
so nothing here repeats a kernel's signature.

Built libraries are cached by content hash (``$OPBENCH_CACHE_DIR`` or ``~/.cache/opbench``),
written under a temporary name and renamed, so parallel workers never load a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HEADER = Path(__file__).with_name("cuda_emulation.h")
EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
STATIC_SHARED = re.compile(r"__shared__\s+(\w+)\s+(\w+)\s*((?:\[[^\]]+\]\s*)*);")
CXX_FLAGS = ("-std=c++20", "-O2", "-fPIC", "-shared", "-U_FORTIFY_SOURCE", "-Wall",
             "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-unused-variable")
MAX_PARAMS = 64


class EmulatorBuildError(RuntimeError):
    """The host compiler rejected a kernel source (the message carries its log)."""


def compiler() -> str | None:
    """The host C++ compiler: $CXX, else g++ on PATH; None when there is none."""
    return os.environ.get("CXX") or shutil.which("g++")


def compiler_status() -> tuple[bool, str]:
    cxx = compiler()
    if cxx is None:
        return False, "no host C++ compiler: install g++ (or set CXX) to emulate the kernels"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        return False, f"the host C++ compiler {cxx} does not run: {exc}"
    return True, version


def host_source(source: str, names: list[str]) -> str:
    """The NVRTC source made compilable by g++, plus one launcher per name expression."""
    body = EXTERN_SHARED.sub(
        lambda m: f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(::opb::dynamic_smem());", source)
    sites = iter(range(1 << 30))
    body = STATIC_SHARED.sub(lambda m: _static_shared(m[1], m[2], m[3].replace(" ", ""),
                                                      next(sites)), body)
    lines = ["#define OPB_EMULATE 1", f'#include "{HEADER.as_posix()}"', body]
    for i, name in enumerate(names):
        lines.append(
            f'extern "C" int opb_launch_{i}(const unsigned* grid, const unsigned* block, '
            f"size_t shared_bytes, void** args, char* error, size_t error_len) {{ return "
            f"::opb::launch(&{name}, grid, block, shared_bytes, args, error, error_len); }}")
        lines.append(f'extern "C" int opb_params_{i}(size_t* out, int capacity) {{ return '
                     f"::opb::param_sizes(&{name}, out, capacity); }}")
    return "\n".join(lines) + "\n"


def _static_shared(ctype: str, name: str, dims: str, site: int) -> str:
    """`__shared__ T name[A][B];` -> a reference of that type into the block's shared memory."""
    full = f"{ctype}{dims}"
    return (f"{ctype} (&{name}){dims} = *reinterpret_cast<{ctype}(*){dims}>("
            f"::opb::static_shared({site}, sizeof({full})));" if dims else
            f"{ctype}& {name} = *reinterpret_cast<{ctype}*>("
            f"::opb::static_shared({site}, sizeof({ctype})));")


def cache_dir() -> Path:
    """$OPBENCH_CACHE_DIR or ~/.cache/opbench, else the temp directory (a read-only home)."""
    root = os.environ.get("OPBENCH_CACHE_DIR") or Path.home() / ".cache" / "opbench"
    for base in (Path(root), Path(tempfile.gettempdir()) / f"opbench-{os.getuid()}"):
        path = base / "cuda-emulator"
        try:
            path.mkdir(parents=True, exist_ok=True)
            return path
        except OSError:
            continue
    raise EmulatorBuildError(f"no writable cache directory for built kernels (tried {root})")


def build_library(source: str, names: list[str], label: str) -> Path:
    """Path of the shared library for (source, names), compiling it on a cache miss."""
    cxx = compiler()
    if cxx is None:
        raise EmulatorBuildError(compiler_status()[1])
    text = host_source(source, names)
    digest = hashlib.sha256("\0".join([text, HEADER.read_text(), cxx, *CXX_FLAGS]).encode())
    target = cache_dir() / f"{Path(label).stem}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cpp, out = Path(tmp) / f"{Path(label).stem}.cpp", Path(tmp) / "lib.so"
        cpp.write_text(text)
        done = subprocess.run([cxx, *CXX_FLAGS, str(cpp), "-o", str(out)], capture_output=True,
                              text=True)
        if done.returncode != 0 or done.stderr.strip():
            raise EmulatorBuildError(f"{cxx} could not build {label} for the emulator:\n"
                                     f"{done.stderr.strip()}")
        os.replace(out, target)
    return target


@dataclass(frozen=True)
class HostKernel:
    """One instantiation in a built library: launch() runs the whole grid on this thread."""

    name: str
    param_sizes: tuple[int, ...]
    _launch: ctypes._CFuncPtr

    def launch(self, grid: tuple[int, int, int], block: tuple[int, int, int], shared_bytes: int,
               arg_pointers: ctypes.Array) -> str | None:
        """None on success, else the emulator's error (barrier divergence, bad shuffle)."""
        error = ctypes.create_string_buffer(1024)
        failed = self._launch((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
                              shared_bytes, arg_pointers, error, len(error))
        return error.value.decode(errors="replace") if failed else None


def load_kernels(source: str, names: list[str], label: str) -> dict[str, HostKernel]:
    library = ctypes.CDLL(str(build_library(source, names, label)))
    kernels = {}
    for i, name in enumerate(names):
        query = getattr(library, f"opb_params_{i}")
        query.restype, query.argtypes = ctypes.c_int, [ctypes.POINTER(ctypes.c_size_t),
                                                       ctypes.c_int]
        sizes = (ctypes.c_size_t * MAX_PARAMS)()
        count = query(sizes, MAX_PARAMS)
        launch = getattr(library, f"opb_launch_{i}")
        launch.restype = ctypes.c_int
        launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                           ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                           ctypes.c_size_t]
        kernels[name] = HostKernel(name, tuple(sizes[:count]), launch)
    return kernels
