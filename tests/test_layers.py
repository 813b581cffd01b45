"""The package's folders are layers: a module imports only from its own layer or lower ones.

cli > reports > perf > harness > backends > protocol/errors > reference.  Parsed, never
imported, so a lazy import inside a function counts as much as one at the top of a file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "opbench"

#: top first; a module may import its own layer and any layer after it
LAYERS = ["cli", "reports", "perf", "harness", "backends", "protocol", "reference"]
#: modules that sit on a layer without being a folder of it
LAYER_OF_MODULE = {"protocol": "protocol", "errors": "protocol", "__init__": "protocol",
                   "__main__": "cli"}


def layer_of(module: str) -> str | None:
    """'opbench.harness.runner' -> 'harness'; None for modules outside opbench."""
    parts = module.split(".")
    if parts[0] != "opbench":
        return None
    if len(parts) == 1:
        return "protocol"
    return LAYER_OF_MODULE.get(parts[1], parts[1])


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    return ".".join(rel.parts)


def imports_of(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """Absolute names of the opbench modules ``path`` imports (relative imports resolved)."""
    here = module_name(path, package).split(".")
    owner = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = owner[: len(owner) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, target))
    return [(line, name) for line, name in found if name.split(".")[0] == "opbench"]


def violations(path: Path, package: Path = PACKAGE) -> list[str]:
    own = LAYERS.index(layer_of(module_name(path, package)))
    bad = []
    for line, name in imports_of(path, package):
        layer = layer_of(name)
        if layer in LAYERS and LAYERS.index(layer) < own:
            bad.append(f"{path.relative_to(package.parent)}:{line} imports {name} ({layer})")
    return bad


def test_every_module_sits_on_a_known_layer():
    unknown = sorted({layer_of(module_name(p)) for p in PACKAGE.rglob("*.py")} - set(LAYERS))
    assert not unknown, f"folders that are no layer: {unknown}; add them to LAYERS"


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_a_layer_above_it(layer):
    files = [p for p in PACKAGE.rglob("*.py") if layer_of(module_name(p)) == layer]
    bad = [v for p in files for v in violations(p)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
    fake = tmp_path / "opbench"
    (fake / "harness").mkdir(parents=True)
    module = fake / "harness" / "x.py"
    module.write_text("from opbench.cli import main\nfrom ..perf import gate\nfrom . import ops\n")
    assert [v.split(" imports ")[1] for v in violations(module, fake)] == [
        "opbench.cli (cli)", "opbench.perf (perf)"]
