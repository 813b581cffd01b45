"""One side of a cross-commit ``opbench perf --ab`` (``--ab cpu@../base cpu``), as its own process.

The parent (``opbench.perf.cross_ab``) starts this file with the side's source tree as its
argument (and first on ``PYTHONPATH``), so ``import opbench`` here loads that tree -- possibly an
older opbench than the parent's -- and nothing of opbench from anywhere else.  What runs from
that tree is kept to the entry points in ``ENTRY_POINTS`` (backend lookup, the perf case table,
one prepared call, the NaN check and the oracle judge of the timed outputs); the protocol, the
timing loop and the records are this file's and the parent's, the same code for both sides.
Only the standard library and NumPy are imported before the tree's opbench, so this file runs
against any tree that has those entry points (docs/ci.md says which opbench that is).

Protocol, version ``PROTOCOL``: JSON lines.  The worker speaks first, unasked, with
``{"protocol", "opbench", "file", "missing"}`` (``error`` instead when the tree's opbench does not
import); then it answers each request read from stdin with one line on its original stdout,
which it keeps to itself (whatever a backend prints to stdout goes to stderr).  Requests:

``open {ref, sizes}``         -> ``{name, device, threads, follows_cpus, env, cases}``
                                (cases: the perf case ids)
``prepare {case, seed, cold, fresh_inputs}`` -> ``{status, reason, errors, bytes, flops,
                                output_judged}`` (new buffers; the previous ones stay allocated)
``warmup {calls}``            -> ``{}``
``time {samples, slice_ms, limit}`` -> ``{ns}``: samples of the prepared call, at least
                                ``samples``, more until ``slice_ms`` passed, at most ``limit``
``judge``                     -> ``{problem}``: the timed calls' outputs against the oracle
``release``                   -> ``{}``: drop the case's buffers
``close``                     -> ``{}``, then the worker ends
Every answer has ``ok``; ``ok: false`` comes with a one-line ``error``.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import traceback

PROTOCOL = 1

#: what this worker calls in the side's tree (module -> names); opbench 0.1.0 has them from
#: the commit that judges the outputs of timed calls (3c9d735) on
ENTRY_POINTS = {
    "opbench.harness.registry": ("parse_ref", "open_backend", "device_label", "first_device"),
    "opbench.perf.run": ("perf_cases", "refusal", "prepare", "nan_problem", "refresh_inputs",
                         "output_judged", "timed_output_problem"),
}


def load_entry_points() -> tuple[dict, list[str]]:
    """{dotted name: object} of every entry point the tree has, and the names it lacks."""
    found, missing = {}, []
    for module_name, names in ENTRY_POINTS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing += [f"{module_name}.{name}" for name in names]
            continue
        for name in names:
            if hasattr(module, name):
                found[name] = getattr(module, name)
            else:
                missing.append(f"{module_name}.{name}")
    return found, missing


def environment(info: dict) -> dict:
    """The tree's own record environment (its version and commit) when it has one."""
    try:
        from opbench.harness.records import environment as tree_environment
    except ImportError:
        return {"backend_info": info}
    return tree_environment(info)


class Worker:
    def __init__(self, api: dict) -> None:
        self.api = api
        self.backend = None
        self.device = None
        self.cases: dict = {}
        self.kept: list = []  # every epoch's prepared call of this case: new ones land elsewhere
        self.rng = None
        self.cold = False

    # -- requests ---------------------------------------------------------------------------------
    def open(self, ref: str, sizes: str) -> dict:
        parsed = self.api["parse_ref"](ref)
        ok, why = parsed.cls.available()
        if not ok:
            raise RuntimeError(f"backend {ref} is unavailable: {why}")
        self.backend = self.api["open_backend"](parsed)
        self.device = self.api["first_device"](self.backend)
        info = _info(self.backend)
        threads = info.get("threads")
        self.cases = {case.id: case for case in self.api["perf_cases"](sizes)}
        return {"name": self.backend.name, "device": self.api["device_label"](self.backend),
                "threads": threads if isinstance(threads, int) and threads > 0 else 1,
                "follows_cpus": threads == "cpus",
                "env": environment({"name": self.backend.name, **info}),
                "cases": list(self.cases)}

    def prepare(self, case: str, seed: int, cold: bool, fresh_inputs: bool) -> dict:
        import numpy as np

        case = self.cases[case]
        reason = self.api["refusal"](self.backend, case)
        if reason:
            return {"status": "UNSUPPORTED", "reason": reason, "errors": []}
        try:
            prepared = self.api["prepare"](self.backend, case, seed)
            problem = self.api["nan_problem"](self.backend, prepared)
        except Exception as exc:  # a broken kernel gives an ERROR record, the run goes on
            return {"status": "ERROR", "reason": f"{type(exc).__name__}: {exc}",
                    "errors": traceback.format_exc(limit=4).splitlines()}
        if problem:
            return {"status": "ERROR", "reason": problem, "errors": []}
        self.kept.append(prepared)
        self.cold = cold
        self.rng = np.random.default_rng(case.seed(seed) + 1) if fresh_inputs else None
        return {"status": "OK", "reason": None, "errors": [], "bytes": prepared.nbytes,
                "flops": prepared.flops, "device_ceilings": prepared.device_ceilings,
                "output_judged": bool(self.api["output_judged"](self.backend, prepared))}

    def warmup(self, calls: int) -> dict:
        for _ in range(calls):
            self.kept[-1].fn()
        self.backend.synchronize(self.device)
        return {}

    def time(self, samples: int, slice_ms: float = 0.0, limit: int | None = None) -> dict:
        """At least ``samples`` samples, and more until ``slice_ms`` have passed (never more
        than ``limit``): one request then carries enough work that its round trip is small."""
        prepared = self.kept[-1]
        timer = self.backend.timer()
        ns = []
        end = time.perf_counter_ns() + int(slice_ms * 1e6)
        limit = max(samples, limit or samples)
        while len(ns) < limit and (len(ns) < samples or time.perf_counter_ns() < end):
            self._between_samples(prepared)
            if timer is not None:
                ns.append(int(timer(prepared.fn)))
            else:
                start = time.perf_counter_ns()
                prepared.fn()
                self.backend.synchronize(self.device)
                ns.append(time.perf_counter_ns() - start)
        return {"ns": ns}

    def _between_samples(self, prepared) -> None:
        """Untimed, as in plain perf: new inputs (--fresh-inputs), the cache flush (--cold)."""
        if self.rng is not None:
            self.backend.synchronize(self.device)  # the last call has read its inputs
            self.api["refresh_inputs"](self.backend, prepared, self.rng)
        if self.cold:
            self.backend.flush_l2(self.device)
        if self.rng is not None or self.cold:
            self.backend.synchronize(self.device)

    def judge(self) -> dict:
        try:
            return {"problem": self.api["timed_output_problem"](self.backend, self.kept[-1])}
        except Exception as exc:
            return {"problem": f"judging the timed outputs raised {type(exc).__name__}: {exc}"}

    def release(self) -> dict:
        self.kept.clear()
        self.rng = None
        return {}

    def close(self) -> dict:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        return {}


def _info(backend) -> dict:
    try:
        return dict(backend.info())
    except Exception as exc:  # info is best effort
        return {"info_error": str(exc)}


def serve(worker: Worker, requests, send) -> None:
    for line in requests:
        request = json.loads(line)
        command = request.pop("cmd")
        try:
            answer = {"ok": True, **getattr(worker, command)(**request)}
        except Exception as exc:  # the tree's usage errors are already one clear line
            name = type(exc).__name__
            text = str(exc) if name == "UsageError" else f"{name}: {exc}"
            answer = {"ok": False, "error": text.splitlines()[0] if text else name}
        send(answer)
        if command == "close":
            return


class TreeOnly:
    """Finds ``opbench`` and its modules in the side's tree and nowhere else: an installed
    opbench (an editable install's finder, say) must not fill in what the tree lacks."""

    def __init__(self, tree: str) -> None:
        self.tree = tree

    def find_spec(self, fullname: str, path=None, target=None):
        from importlib.machinery import PathFinder

        if fullname != "opbench" and not fullname.startswith("opbench."):
            return None
        spec = PathFinder.find_spec(fullname, [self.tree] if fullname == "opbench" else path)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {fullname!r} in {self.tree}",
                                      name=fullname)
        return spec


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # not perf/*.py
    tree = os.path.abspath(sys.argv[1])
    sys.path.insert(0, tree)
    sys.meta_path.insert(0, TreeOnly(tree))
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # a backend's own prints must not corrupt the protocol

    def send(message: dict) -> None:
        channel.write(json.dumps(message, default=str) + "\n")

    try:
        import opbench

        api, missing = load_entry_points()
    except Exception as exc:
        send({"protocol": PROTOCOL, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
        return
    send({"protocol": PROTOCOL, "opbench": getattr(opbench, "__version__", None),
          "file": opbench.__file__, "missing": missing})
    if not missing:
        serve(Worker(api), sys.stdin, send)


if __name__ == "__main__":
    main()
