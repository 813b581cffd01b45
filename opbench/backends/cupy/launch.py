"""Kernel loading and launch for the cupy backend: kernels/*.cu compiled per GPU through
cupy.RawModule, every launch checked against the device limits, fault-injection delays and the
``sync_each_launch`` debug mode."""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np

from . import plan
from .runtime import CupyDevice, CupyRuntime, GpuStream


def _i64(v: int) -> np.int64:
    return np.int64(v)


class KernelLauncher:
    """``source(file_name)`` gives a kernel file's CUDA text (the backend's hook: the bug zoo
    hands mutants); ``delay`` queues a seeded random spin kernel of up to ``delay_max_ms``
    before every op; ``sync_each_launch`` waits for and checks every kernel."""

    def __init__(self, runtime: CupyRuntime, source: Callable[[str], str], delay: bool,
                 delay_seed: int, delay_max_ms: float, sync_each_launch: bool) -> None:
        self.runtime, self.source = runtime, source
        self.delay, self.delay_max_ms = delay, delay_max_ms
        self.sync_each_launch = sync_each_launch
        self._rng = random.Random(delay_seed)
        self._modules: dict[tuple[int, str], Any] = {}
        self._functions: dict[tuple[int, str, str], Any] = {}  # (gpu, file, kernel name)

    def _cupy(self):
        return self.runtime._cupy()

    def kernel(self, dev: CupyDevice, file_name: str, name: str):
        function = self._functions.get((dev.gpu, file_name, name))
        if function is None:
            cupy = self._cupy()
            module = self._modules.get((dev.gpu, file_name))
            with cupy.cuda.Device(dev.gpu):
                if module is None:
                    module = self._modules[(dev.gpu, file_name)] = cupy.RawModule(
                        code=self.source(file_name), options=plan.COMPILE_OPTIONS,
                        name_expressions=plan.module_kernels()[file_name])
                function = self._functions[(dev.gpu, file_name, name)] = \
                    module.get_function(name)
        return function

    def preload(self, devices) -> None:
        """Load every kernel on ``devices`` now.  CUDA does not permit loading a module (or,
        loading lazily, a function) on a device while one of its streams captures a graph,
        so a capture must not be where a kernel is first used (``capture_begin`` calls this)."""
        for dev in devices:
            for file_name, names in plan.module_kernels().items():
                for name in names:
                    self.kernel(dev, file_name, name)

    def run(self, target: GpuStream, file_name: str, name: str, launch: plan.Launch,
             args: tuple, delay: bool = True) -> None:
        kernel = self.kernel(target.device, file_name, name)
        self.launch(target, kernel, name, launch, args, delay)

    def launch(self, target: GpuStream, kernel, name: str, launch: plan.Launch, args: tuple,
                delay: bool = True, check: bool = True) -> None:
        """Every launch goes through here: limits checked first, launch errors re-raised with
        the kernel's name and geometry, and (sync_each_launch) execution errors too."""
        cupy = self._cupy()
        dev = target.device
        plan.check_launch(name, launch, max(plan.DEFAULT_SHARED_LIMIT, dev.shared_optin))
        if delay:
            self.maybe_delay(target)
        with cupy.cuda.Device(dev.gpu), target.cupy_stream:
            if launch.shared_mem > plan.DEFAULT_SHARED_LIMIT:
                kernel.max_dynamic_shared_size_bytes = launch.shared_mem
            try:
                kernel(launch.grid, launch.block, args, shared_mem=launch.shared_mem)
            except cupy.cuda.driver.CUDADriverError as exc:
                raise RuntimeError(f"{dev.name}: launch of {name} {launch} failed: {exc}") \
                    from exc
        if check and self.sync_each_launch and not target.cupy_stream.is_capturing():
            try:
                target.cupy_stream.synchronize()
            except cupy.cuda.runtime.CUDARuntimeError as exc:
                raise RuntimeError(f"{dev.name}: {name} {launch} failed: {exc}") from exc
            self.runtime._raise_device_errors(dev)

    def maybe_delay(self, target: GpuStream) -> None:
        """Fault injection (option delay): a seeded random sleep on the stream before an op."""
        if self.delay:
            self.inject_delay(target, self._rng.uniform(0.0, self.delay_max_ms))

    def inject_delay(self, stream: GpuStream, ms: float) -> None:
        """Fault injection: the stream sleeps ~ms on the GPU (spin kernel with __nanosleep)."""
        self.spin(stream, int(ms * 1e6))

    def spin(self, stream: GpuStream, ns: int) -> None:
        """The stream sleeps ~ns on the GPU (fault injection; the timer's cover for the
        host's enqueue)."""
        stream = self.runtime._own_stream(stream)
        kernel = self.kernel(stream.device, "runtime.cu", "spin_kernel")
        self.launch(stream, kernel, "spin_kernel", plan.Launch((1, 1, 1), (1, 1, 1)),
                     (_i64(ns),), delay=False)

