"""Verb ``doctor``: every registered backend, available or why not, its devices, versions and
the options it takes (with their defaults)."""

from __future__ import annotations

from opbench.errors import UsageError
from opbench.harness.registry import (
    backend_class,
    open_backend,
    registered_names,
    shown_value,
)


def register(subparsers, common) -> None:
    doctor = subparsers.add_parser("doctor", help="every backend: available or why not,"
                                   " devices, versions, options")
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
        else:
            try:
                backend = open_backend(name)
                info = backend.info()
                backend.close()
            except Exception as exc:  # doctor reports what is wrong, it never stops at it
                print(f"{name:8s} broken: {type(exc).__name__}: {exc}")
            else:
                print(f"{name:8s} available  {describe_info(info)}")
        print_options(cls)
    return 0


def describe_info(info: dict) -> str:
    """``key=value, ...`` with switches as on/off, as the options below them read; a backend's
    own word on how it is available (cupy-emu: "kernels emulated ...") comes first, as it is."""
    how = info.get("available")
    details = ", ".join(f"{key}={shown_value(value)}" for key, value in info.items()
                        if key != "available")
    return f"({how}) {details}" if isinstance(how, str) else details


def print_options(cls: type) -> None:
    """One line per option: ``-b NAME:opt=val`` sets it."""
    if not cls.OPTIONS:
        print(f"{'':8s}   options: none")
    for option in cls.OPTIONS:
        print(f"{'':8s}   option {option.describe()}")
