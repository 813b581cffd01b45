"""Mutation score of the case tables against the cpu backend's op code (issue 18).

    PYTHONPATH=. python benchmarks/mutation_score.py --sample 150 --seed 0 \\
        --out /tmp/mutants.jsonl > /tmp/mutation_report.txt

Every single-point mutation of the op functions in ``opbench/backends/cpu/kernels.py`` and
``rope_cache.py`` (operator swaps, comparisons, constants, slice bounds, argument order, and/or,
max/min) is enumerated from the AST; a seeded sample runs, one at a time, in a subprocess that
loads the mutated module in place of the real one (a ``sitecustomize`` import hook, so numba's
cache of ``jit.py`` stays valid).  Each mutant runs ``opbench test -b cpu --quick -o OPS`` and,
if it survives, the full table of OPS; OPS are the ops whose quick tables execute the mutated
function (found once by tracing the unmutated backend).  A mutant that no table executes is
"unreached" (only scenarios, the timer or unit tests call that code).  A survivor of the full
table is run once more, hashing every output of every case: identical bits to the unmutated
backend on every case make it "equivalent"; the rest are listed with their diffs for triage.

Score: caught / (caught + survived), equivalent and unreached mutants left out.  numba-jitted
loop bodies (``jit.py``) are not mutated: the jitted and NumPy paths are compared by tests.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"opbench.backends.cpu.kernels": ROOT / "opbench/backends/cpu/kernels.py",
           "opbench.backends.cpu.rope_cache": ROOT / "opbench/backends/cpu/rope_cache.py"}
OPS = ("ROPE", "ATTN", "KV_ROTATE", "SET_ROWS", "GET_ROWS", "CPY")

SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
         ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
         ast.LShift: ast.RShift, ast.RShift: ast.LShift, ast.BitOr: ast.BitAnd,
         ast.BitAnd: ast.BitOr, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
         ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.And: ast.Or, ast.Or: ast.And,
         ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}

SITECUSTOMIZE = '''
import importlib.abc, importlib.util, os, sys

class _Mutant(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["OPBENCH_MUTANT_MODULE"]:
            return importlib.util.spec_from_file_location(name, os.environ["OPBENCH_MUTANT_FILE"])
        return None

sys.meta_path.insert(0, _Mutant())
'''


@dataclass
class Mutant:
    module: str
    function: str
    line: int
    kind: str
    index: int  # which mutation point of the module (AST walk order)
    status: str = ""  # caught-quick | caught-full | survived | equivalent | unreached
    detail: str = ""
    diff: str = ""


# -- enumerating mutation points -----------------------------------------------------------
def _op_functions(tree: ast.Module):
    """(function name, node) of every top-level function and method, innermost wins."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node


def _points(node: ast.AST) -> list[str]:
    """The mutations one AST node admits (a kind name each)."""
    kinds = []
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAPS:
        kinds.append("operator")
    if isinstance(node, ast.BoolOp):
        kinds.append("and/or")
    if isinstance(node, ast.Compare) and type(node.ops[0]) in SWAPS:
        kinds += ["comparison", "negated comparison"]
    if isinstance(node, ast.Constant) and type(node.value) in (int, float) \
            and not isinstance(node.value, bool):
        kinds.append("constant")
    if isinstance(node, ast.Slice):
        kinds += [f"slice {b}" for b in ("lower", "upper") if getattr(node, b) is not None]
    if isinstance(node, ast.Call):
        if len(node.args) >= 2 and not any(isinstance(a, ast.Starred) for a in node.args):
            kinds.append("argument order")
        if isinstance(node.func, ast.Name) and node.func.id in ("max", "min"):
            kinds.append("max/min")
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("maximum", "minimum"):
            kinds.append("max/min")
    return kinds


def enumerate_mutants() -> list[Mutant]:
    """Every (AST node, mutation kind) inside a function of the target modules; ``index`` is
    the node's position in ``ast.walk`` order, stable for a given source."""
    mutants = []
    for module, path in TARGETS.items():
        tree = ast.parse(path.read_text())
        owner = {}
        for name, fn in _op_functions(tree):
            for node in ast.walk(fn):
                owner[id(node)] = name  # inner functions overwrite: innermost wins
        skip = _annotation_nodes(tree)
        for index, node in enumerate(ast.walk(tree)):
            if id(node) in owner and id(node) not in skip and not _docstring(node):
                mutants += [Mutant(module, owner[id(node)], node.lineno, kind, index)
                            for kind in _points(node)]
    return mutants


def _annotation_nodes(tree: ast.Module) -> set[int]:
    """Nodes inside type annotations: never evaluated here (postponed annotations)."""
    roots = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign))
             and n.annotation is not None]
    roots += [n.returns for n in ast.walk(tree)
              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns]
    return {id(sub) for root in roots for sub in ast.walk(root)}


def _docstring(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _apply(node: ast.AST, kind: str) -> None:
    if kind == "operator":
        node.op = SWAPS[type(node.op)]()
    elif kind == "and/or":
        node.op = SWAPS[type(node.op)]()
    elif kind == "comparison":
        node.ops[0] = SWAPS[type(node.ops[0])]()
    elif kind == "negated comparison":
        negate = {ast.Lt: ast.GtE, ast.LtE: ast.Gt, ast.Gt: ast.LtE, ast.GtE: ast.Lt}
        node.ops[0] = negate.get(type(node.ops[0]), SWAPS[type(node.ops[0])])()
    elif kind == "constant":
        node.value = {0: 1, 1: 0}.get(node.value, node.value + 1 if isinstance(node.value, int)
                                      else node.value * 2)
    elif kind.startswith("slice"):
        bound = kind.split()[1]
        setattr(node, bound, ast.BinOp(getattr(node, bound), ast.Add(), ast.Constant(1)))
    elif kind == "argument order":
        node.args[0], node.args[1] = node.args[1], node.args[0]
    elif kind == "max/min":
        if isinstance(node.func, ast.Name):
            node.func.id = {"max": "min", "min": "max"}[node.func.id]
        else:
            node.func.attr = {"maximum": "minimum", "minimum": "maximum"}[node.func.attr]


def mutated_source(mutant: Mutant) -> str:
    tree = ast.parse(TARGETS[mutant.module].read_text())
    node = next(n for i, n in enumerate(ast.walk(tree)) if i == mutant.index)
    _apply(node, mutant.kind)
    return ast.unparse(ast.fix_missing_locations(tree))


def _unified_diff(mutant: Mutant, source: str) -> str:
    original = ast.unparse(ast.parse(TARGETS[mutant.module].read_text()))
    diff = difflib.unified_diff(original.splitlines(), source.splitlines(), lineterm="", n=1)
    return "\n".join(list(diff)[2:])


# -- which ops reach which functions ---------------------------------------------------------
def reach_map(seed: int) -> dict[str, list[str]]:
    """function name -> ops whose --quick table runs it on the unmutated cpu backend (traced
    in a subprocess so the backend's worker threads are traced too)."""
    code = f"""
import json, sys, threading
from opbench.backends.cpu import CpuBackend
from opbench.harness.ops import SPECS
from opbench.harness.runner import run_case
files = {sorted(str(p) for p in TARGETS.values())!r}
reached, current = {{}}, [None]
def tracer(frame, event, arg):
    if event == "call" and frame.f_code.co_filename in files:
        reached.setdefault(frame.f_code.co_name, set()).add(current[0])
    return None
sys.setprofile(tracer); threading.setprofile(tracer)
for op in {list(OPS)!r}:
    current[0] = op
    backend = CpuBackend(); backend.devices(1)
    for case in SPECS[op].quick_cases(seed={seed}):
        run_case(backend, case, run_seed={seed})
    backend.close()
print(json.dumps({{k: sorted(v) for k, v in reached.items()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env=_env(), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    env.update(extra or {})
    return env


# -- running one mutant ----------------------------------------------------------------------
JUDGED = """
import hashlib, json, os, pickle, sys
import opbench.harness.runner as runner
from opbench.backends.cpu import CpuBackend
from opbench.harness.ops import SPECS
from opbench.harness.runner import KnownFailures, run_case
ops, quick, seed = sys.argv[1].split(","), sys.argv[2] == "quick", int(sys.argv[3])
computed = runner.references

def cached_references(spec, case, inputs):
    # the oracles import nothing of the backends, so every mutant shares one copy of them
    path = os.path.join(os.environ["OPBENCH_ORACLE_CACHE"],
                        hashlib.sha1(f"{case.id}|{seed}".encode()).hexdigest())
    if os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    result = computed(spec, case, inputs)
    with open(f"{path}.{os.getpid()}", "wb") as f:
        pickle.dump(result, f)
    os.replace(f"{path}.{os.getpid()}", path)
    return result

runner.references = cached_references
backend = CpuBackend(); backend.devices(1)
known = KnownFailures(backend.known_failures())
first, count = None, 0
for op in ops:
    cases = SPECS[op].quick_cases(seed=seed) if quick else SPECS[op].cases()
    for case in cases:
        record = run_case(backend, case, run_seed=seed, known=known)
        count += 1
        if record["status"] not in ("OK", "XFAIL", "UNSUPPORTED"):
            first = f"{case.id}: {record['status']} {record.get('reason', '')}"
            break
    if first:
        break
backend.close()
print(json.dumps({"failed": first, "cases": count}))
"""


def _judged(ops: list[str], quick: bool, env: dict, timeout: float, seed: int):
    """The --quick (or full) table of ``ops`` on the cpu backend, judged case by case as
    ``opbench test -b cpu`` judges them (run_case, the backend's known failures), stopping at
    the first case that does not pass: a caught mutant needs no more."""
    cmd = [sys.executable, "-c", JUDGED, ",".join(ops), "quick" if quick else "full", str(seed)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "no result within the timeout (a hang counts as caught)"
    try:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return "failed", "the run died: " + (out.stderr.strip().splitlines() or ["?"])[-1]
    if result["failed"] is None:
        return "passed", ""
    return "failed", f"case {result['cases']} of the table fails: {result['failed'][:300]}"


def output_hashes(ops: list[str], env: dict, timeout: float, seed: int) -> dict[str, str]:
    """case id -> sha1 of every output's bytes, full tables of ``ops`` (the bit-identity test
    for equivalent mutants)."""
    code = f"""
import hashlib, json
import numpy as np
from opbench.backends.cpu import CpuBackend
from opbench.harness.ops import SPECS
from opbench.harness.runner import execute
backend = CpuBackend(); backend.devices(1)
hashes = {{}}
for op in {ops!r}:
    spec = SPECS[op]
    for case in spec.cases():
        try:
            inputs = spec.make_inputs(case, np.random.default_rng(case.seed({seed})))
            _, hosts = execute(backend, spec, case, inputs, None)
            digest = hashlib.sha1(b"".join(np.ascontiguousarray(h).tobytes()
                                           for _, h in sorted(hosts.items())))
            hashes[case.id] = digest.hexdigest()
        except Exception as exc:  # noqa: BLE001
            hashes[case.id] = "error: " + type(exc).__name__
backend.close()
print(json.dumps(hashes))
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=timeout)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError):
        return {}


def run_mutant(mutant: Mutant, ops: list[str], workdir: Path, args, baseline) -> Mutant:
    source = mutated_source(mutant)
    mutant.diff = _unified_diff(mutant, source)
    if not ops:
        mutant.status, mutant.detail = "unreached", "no --quick table calls this function"
        return mutant
    mutant_file = workdir / "mutant.py"
    mutant_file.write_text(source)
    env = _env({"OPBENCH_MUTANT_MODULE": mutant.module, "OPBENCH_MUTANT_FILE": str(mutant_file),
                "PYTHONPATH": f"{workdir}{os.pathsep}{ROOT}",
                "OPBENCH_ORACLE_CACHE": str(workdir.parent / "oracle")})
    result, detail = _judged(ops, True, env, args.timeout, args.seed)
    if result != "passed":
        mutant.status, mutant.detail = "caught-quick", detail
        return mutant
    # Bits first: a mutant whose outputs (and raised errors) match the unmutated backend's on
    # every case of the full table gets the same verdicts from the judge, so only mutants whose
    # bits differ pay for the judged full table (the oracles are most of its time).
    mine = output_hashes(ops, env, args.timeout * 10, args.seed)
    reference = baseline(ops)
    if mine and all(mine.get(k) == v for k, v in reference.items()):
        mutant.status = "equivalent"
        mutant.detail = "identical output bits on every case of the full table"
        return mutant
    result, detail = _judged(ops, False, env, args.timeout * 10, args.seed)
    if result != "passed":
        mutant.status, mutant.detail = "caught-full", detail
        return mutant
    differing = sorted(k for k, v in reference.items() if mine.get(k) != v)
    mutant.status = "survived"
    mutant.detail = (f"{len(differing)} cases give other bits, every one within the judge's "
                     f"rules: {', '.join(differing[:3])}{', ...' if len(differing) > 3 else ''}")
    return mutant


# -- the report ------------------------------------------------------------------------------
def summary(mutants: list[Mutant]) -> str:
    count = {s: sum(m.status == s for m in mutants) for s in
             ("caught-quick", "caught-full", "survived", "equivalent", "unreached")}
    judged = count["caught-quick"] + count["caught-full"] + count["survived"]
    full = (count["caught-quick"] + count["caught-full"]) / judged if judged else 0.0
    quick = count["caught-quick"] / judged if judged else 0.0
    lines = [f"mutants run: {len(mutants)}; " + ", ".join(f"{k}: {v}" for k, v in count.items()),
             f"score (non-equivalent, reached): full table {full:.1%}, --quick {quick:.1%} "
             f"of {judged}"]
    for m in mutants:
        if m.status in ("survived", "equivalent", "unreached"):
            lines += [f"\n{m.status.upper()}: {m.module.rsplit('.', 1)[1]}.{m.function} line "
                      f"{m.line} ({m.kind}): {m.detail}", m.diff]
    return "\n".join(lines)


def _key(mutant: Mutant) -> tuple:
    return mutant.module, mutant.index, mutant.kind


def _read(path: Path) -> list[Mutant]:
    return [Mutant(**json.loads(line)) for line in path.read_text().splitlines() if line]


def run_sample(sample: list[Mutant], reach: dict, tmp: Path, args, baseline) -> list[Mutant]:
    """Runs every mutant (``args.jobs`` at a time, each writing its mutated module into its
    own directory under ``tmp``: the source tree is never touched); progress to stderr and
    ``args.out`` as each finishes, results in sample order."""
    write_lock, free_dirs = threading.Lock(), []
    (tmp / "oracle").mkdir()
    for job in range(max(1, args.jobs)):
        workdir = tmp / f"job{job}"
        workdir.mkdir()
        (workdir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        free_dirs.append(workdir)

    def one(numbered):
        number, mutant = numbered
        with write_lock:
            workdir = free_dirs.pop()
        started = time.time()
        try:
            run_mutant(mutant, reach.get(mutant.function, []), workdir, args, baseline)
        finally:
            with write_lock:
                free_dirs.append(workdir)
        with write_lock:
            print(f"[{number}/{len(sample)}] {mutant.status:12s} {mutant.function} "
                  f"line {mutant.line} {mutant.kind} ({time.time() - started:.0f} s)",
                  file=sys.stderr, flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(asdict(mutant)) + "\n")
        return mutant

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        return list(pool.map(one, enumerate(sample, 1)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=150, help="mutants to run (seeded)")
    parser.add_argument("--seed", type=int, default=0, help="sample and case seed")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds for a --quick run (x10 for a full table)")
    parser.add_argument("--out", type=Path, help="JSON Lines of every mutant, as it finishes")
    parser.add_argument("--function", help="only mutants in functions matching this name")
    parser.add_argument("-j", "--jobs", type=int, default=1,
                        help="mutants run side by side (each in its own directory)")
    parser.add_argument("--resume", action="store_true",
                        help="mutants already in --out are not run again (a stopped run goes "
                             "on); the summary counts them")
    parser.add_argument("--rerun", type=Path, metavar="JSONL",
                        help="instead of a sample: the survivors recorded in JSONL, run again "
                             "(after adding cases)")
    args = parser.parse_args(argv)
    mutants = enumerate_mutants()
    if args.function:
        mutants = [m for m in mutants if args.function in m.function]
    sample = random.Random(args.seed).sample(mutants, min(args.sample, len(mutants)))
    if args.rerun:
        survivors = {_key(m) for m in _read(args.rerun) if m.status == "survived"}
        sample = [m for m in mutants if _key(m) in survivors]
    previous = _read(args.out) if args.resume and args.out and args.out.exists() else []
    sample = [m for m in sample if _key(m) not in {_key(p) for p in previous}]
    print(f"{len(mutants)} mutation points; running {len(sample)}", file=sys.stderr)
    reach = reach_map(args.seed)
    cache: dict[tuple, dict] = {}
    cache_lock = threading.Lock()

    def baseline(ops):
        with cache_lock:  # one unmutated run per set of ops, even with --jobs
            key = tuple(ops)
            if key not in cache:
                cache[key] = output_hashes(ops, _env(), args.timeout * 10, args.seed)
            return cache[key]

    with tempfile.TemporaryDirectory() as tmp:
        done = run_sample(sample, reach, Path(tmp), args, baseline)
    print(summary(previous + done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
