"""Backend lookup and construction: every verb, the pytest suites and ``opbench doctor`` open
a backend through ``open_backend(ref)``.

A reference is a registered name (the ``opbench.backends`` entry points in pyproject.toml: the
one list of backends), ``package.module:Class`` or ``path/to/file.py:Class`` (a kernel under
development), optionally followed by options: ``NAME[:opt=val,...]``, e.g.
``cpu:rope_cache=off`` or ``path/file.py:Class:opt=val``.  A tail after the last ``:`` counts
as options only when it holds ``=``.  Option values are parsed by the backend's declared
``OPTIONS`` (``opbench.protocol.Option``); an unknown name or a bad value is a usage error
listing the valid options.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from opbench.errors import UsageError
from opbench.protocol import Backend, parse_options

GROUP = "opbench.backends"
#: where the entry points are declared, read directly when opbench runs uninstalled
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@lru_cache(maxsize=1)
def registered() -> dict[str, str]:
    """Registered name -> ``package.module:Class``, in declaration order."""
    found = {ep.name: ep.value for ep in entry_points(group=GROUP)}
    return found or _declared_in_pyproject()


def _declared_in_pyproject() -> dict[str, str]:
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        return {}
    if not PYPROJECT.is_file():
        return {}

    with PYPROJECT.open("rb") as file:
        table = tomllib.load(file)
    return dict(table.get("project", {}).get("entry-points", {}).get(GROUP, {}))


def registered_names() -> list[str]:
    return list(registered())


# -- references --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackendRef:
    """A parsed ``-b`` value: the text as given, the class it names, its option strings."""

    text: str
    target: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def cls(self) -> type:
        return backend_class(self.target)


def _value(text: str) -> Any:
    """A number where the text is one; the declared Option parses every value in the end."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def split_ref(ref: str) -> tuple[str, dict[str, Any]]:
    """``cpu:rope_cache=off,jit=0`` -> ("cpu", {"rope_cache": "off", "jit": 0})."""
    head, sep, tail = ref.rpartition(":")
    if not sep or "=" not in tail:
        return ref, {}
    options = {}
    for item in tail.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"backend {ref!r}: option {item!r} is not opt=value")
        options[key.strip()] = _value(value.strip())
    return head, options


def split_backend_list(value: str) -> list[str]:
    """A ``-b`` list: comma separated refs, where an item holding ``=`` but no ``:`` continues
    the previous ref's options (``cpu:rope_cache=off,jit=0,torch`` is two refs)."""
    refs: list[str] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        if refs and "=" in item and ":" not in item and "=" in refs[-1]:
            refs[-1] += "," + item
        else:
            refs.append(item)
    return refs


def parse_ref(ref: str) -> BackendRef:
    """The reference resolved (class found, options checked), or a UsageError."""
    target, options = split_ref(ref.strip())
    parsed = BackendRef(ref.strip(), target, options)
    backend_options(parsed)
    return parsed


def backend_options(ref: BackendRef, extra: dict | None = None) -> dict:
    """The ref's options over ``extra`` (e.g. ``--rope-cache`` sugar), parsed and complete;
    a UsageError naming the valid options for an unknown name or a bad value."""
    cls = ref.cls
    given = {**(extra or {}), **ref.options}
    try:
        return parse_options(cls.name, cls.OPTIONS, given)
    except ValueError as exc:
        raise UsageError(f"backend {ref.text!r}: {exc}") from None


def backend_label(ref: str | BackendRef, extra: dict | None = None) -> str:
    """What records and consoles call a configured backend: its name, then every option whose
    value differs from its default, sorted (``cpu:rope_cache=off``).  Records are keyed on
    it, so two configurations run together must not share one (report and gate would merge
    them, the last record winning), and one configuration gets one label however it was
    typed (``-b cpu:rope_cache=on`` is ``cpu``) in test, scenario and perf alike."""
    parsed = parse_ref(ref) if isinstance(ref, str) else ref
    values = backend_options(parsed, extra)
    defaults = {option.name: option.default for option in parsed.cls.OPTIONS}
    changed = [f"{name}={shown_value(value)}" for name, value in sorted(values.items())
               if name not in defaults or value != defaults[name]]
    return _own_name(parsed) + (":" + ",".join(changed) if changed else "")


def _own_name(parsed: BackendRef) -> str:
    """The class's ``name``; but a plug-in that inherits it (``class Mine(CpuBackend)`` with
    no ``name`` of its own) is called by its class's name: its records must not join the
    built-in backend's history and baselines as if they were the built-in's."""
    cls = parsed.cls
    if parsed.target in registered() or "name" in vars(cls):
        return cls.name
    return cls.__name__


def shown_value(value: Any) -> str:
    """An option's value as a command line writes it: switches as on/off."""
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else str(value)


def open_backend(ref: str | BackendRef, extra: dict | None = None, devices: int = 1
                 ) -> Backend:
    """The backend ``ref`` names, made with its options (over ``extra``), ``devices(n)`` called.
    Raises UsageError for a bad reference or option; the backend's own errors otherwise (an
    unavailable backend: check ``ref.cls.available()`` first)."""
    parsed = parse_ref(ref) if isinstance(ref, str) else ref
    backend = parsed.cls(**backend_options(parsed, extra))
    backend.devices(devices)
    return backend


def first_device(backend: Backend) -> Any:
    """The device single-device runs use: the first one ``devices(n)`` made (None if none)."""
    devices = backend.device_list()
    return devices[0] if devices else None


def device_label(backend: Backend) -> str:
    device = first_device(backend)
    return str(device) if device is not None else f"{backend.name}:0"


# -- classes -----------------------------------------------------------------------------------
def _load_file_class(path: str, class_name: str) -> type:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"backend file {path!r} does not exist")
    module_name = f"opbench_user_backend_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file is bad input: one line naming where, exit 2
        del sys.modules[module_name]
        raise UsageError(f"cannot load backend file {import_failure(exc, file)}") from None
    return _class_from(module, class_name, path)


def import_failure(exc: BaseException, file: Path | None = None) -> str:
    """'path:line: ExcType: message' for an exception raised while importing user code: the
    line of ``file`` (or of the innermost frame) where it went wrong."""
    summary = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}: {summary}"
    frames = traceback.extract_tb(exc.__traceback__)
    if file is not None:
        ours = [f for f in frames if Path(f.filename).resolve() == file.resolve()]
        frames = ours or frames
    if not frames:
        return summary
    return f"{frames[-1].filename}:{frames[-1].lineno}: {summary}"


def _class_from(module, class_name: str, where: str) -> type:
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UsageError(f"{where} has no class {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise UsageError(f"{where}:{class_name} is not a subclass of opbench Backend")
    return cls


def _load_reference(ref: str) -> type:
    target, _, class_name = ref.rpartition(":")
    if target.endswith(".py"):
        return _load_file_class(target, class_name)
    try:
        module = importlib.import_module(target)
    except ImportError as exc:
        if exc.name and target.startswith(exc.name):  # the module itself is not there
            raise UsageError(f"cannot import backend module {target!r}: {exc}") from None
        raise UsageError(f"cannot import backend module {target!r}: "
                         f"{import_failure(exc)}") from None
    except Exception as exc:
        raise UsageError(f"cannot import backend module {target!r}: "
                         f"{import_failure(exc)}") from None
    return _class_from(module, class_name, target)


def backend_class(ref: str) -> type:
    """Resolve a -b value (options allowed, ignored here) to a Backend subclass, or raise
    UsageError naming the choices."""
    name, _ = split_ref(ref)
    if name in registered():
        return _load_reference(registered()[name])
    if ":" in name:
        return _load_reference(name)
    raise UsageError(f"unknown backend {name!r}; choose from {', '.join(registered_names())}"
                     " or give package.module:Class or path/file.py:Class")
