"""Triton's interpreter, patched once per launch instead of once per device-function call.

The interpreter runs a kernel as Python: at a launch it swaps ``triton.language``'s builtins
for NumPy-backed ones (``_patch_lang``, undone when the launch ends).  It does the same again
at every call of a ``@triton.jit`` helper inside the kernel -- a scan of every member of
``triton.language``, its ``core``, ``math`` and ``tensor``, ~2 ms here -- although the launch
already patched the same modules.  Our kernels call helpers (loads, stores, slot lookups) in
every program, so the scans took about a fifth of an interpreted scenario's time.

``OncePerLaunch`` wraps ``_patch_lang``: a helper whose language modules the current launch
has patched already is not patched again; one that sees a module the launch has not patched
(Triton's own ``zeros_like`` sees ``core`` only) is patched as before, and counts as patched
until the launch ends.  A launch is the call made outside any launch; it ends when Triton
restores its scope.  What runs is unchanged: the same patched functions, in the same order.
Launches are not concurrent (the interpreter's patches are process-wide; the backend holds a
lock around each), so one state per process is enough.

Where Triton's interpreter lacks ``_patch_lang`` (another release), nothing is patched: the
kernels run as they would without it, only slower.
"""

from __future__ import annotations

from typing import Any, Callable


class OncePerLaunch:
    """A ``_patch_lang`` that skips the patches the current launch has made already."""

    def __init__(self, patch_lang: Callable[[Any], Any], language_modules: tuple) -> None:
        self.patch_lang = patch_lang
        self.language_modules = language_modules  # those _patch_lang patches: tl, tl.core
        self.patched: frozenset[int] | None = None  # inside a launch: ids of patched modules
        self.skipped = 0  # device-function calls that needed no patching (for the tests)
        self._seen: dict[Any, frozenset[int]] = {}  # per function: a scan of its globals

    def modules_seen_by(self, fn) -> frozenset[int]:
        if fn not in self._seen:  # a function's globals are scanned once, not at every call
            self._seen[fn] = frozenset(
                id(value) for value in fn.__globals__.values()
                if any(value is module for module in self.language_modules))
        return self._seen[fn]

    def __call__(self, fn):
        modules = self.modules_seen_by(fn)
        if self.patched is None:  # a launch starts
            scope = self.patch_lang(fn)
            self.patched = modules
            return _LaunchScope(scope, self)
        if modules <= self.patched:
            self.skipped += 1
            return _NothingToRestore()
        self.patched = self.patched | modules
        return self.patch_lang(fn)  # Triton keeps a device call's patches until the launch ends


class _LaunchScope:
    """The launch's own scope: restoring it ends the launch."""

    def __init__(self, scope, owner: OncePerLaunch) -> None:
        self._scope, self._owner = scope, owner

    def restore(self) -> None:
        self._owner.patched = None
        self._scope.restore()

    def __getattr__(self, name: str):
        return getattr(self._scope, name)


class _NothingToRestore:
    def restore(self) -> None:
        pass


def install() -> OncePerLaunch | None:
    """Wrap the interpreter's ``_patch_lang`` (once per process); None where it has none."""
    import triton.language as tl
    from triton.runtime import interpreter

    current = getattr(interpreter, "_patch_lang", None)
    if isinstance(current, OncePerLaunch):
        return current
    if not callable(current):
        return None
    wrapped = OncePerLaunch(current, (tl, tl.core))
    interpreter._patch_lang = wrapped
    return wrapped
