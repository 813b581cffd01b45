"""Verb ``doctor``: every registered backend, available or why not, its devices and versions."""

from __future__ import annotations

from opbench.errors import UsageError
from opbench.harness.pool import make_backend
from opbench.harness.registry import backend_class, registered_names


def register(subparsers, common) -> None:
    doctor = subparsers.add_parser("doctor", help="every backend: available or why not,"
                                   " devices, versions")
    doctor.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    for name in registered_names():
        try:
            cls = backend_class(name)
        except UsageError as exc:
            print(f"{name:8s} not loadable: {exc}")
            continue
        ok, why = cls.available()
        if not ok:
            print(f"{name:8s} unavailable: {why}")
            continue
        backend = make_backend(name, {})
        info = backend.info()
        backend.close()
        details = ", ".join(f"{k}={v}" for k, v in info.items())
        print(f"{name:8s} available  {details}")
    return 0
