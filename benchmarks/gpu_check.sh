#!/usr/bin/env bash
# The first GPU verification in one go (<= 10 minutes on one GPU), everything under OUT_DIR:
#   gpu-marked tests, full test tables on cupy/torch and Triton's quick ones, a scenario subset
#   with CUDA graphs,
#   perf of cupy vs torch (SDPA) vs triton, the figures of docs/gpu.md, and the report;
#   OUT_DIR/summary.md says what ran, how long, and what failed.
# --dry-run runs the same steps on the CPU (cupy-emu, Triton's interpreter, --quick tables,
# small perf sizes), so the script is known to work before a GPU ever sees it.
#
#   benchmarks/gpu_check.sh [--dry-run] OUT_DIR
# Exit code: 0 every step passed, 1 a step failed or ran out of time, 2 a usage error.
set -uo pipefail

usage() { echo "usage: $0 [--dry-run] OUT_DIR" >&2; exit 2; }
DRY=0
case "${1:-}" in --dry-run) DRY=1; shift ;; -*) usage ;; esac
[ $# -eq 1 ] || usage
OUT=$1
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OB="$PY -m opbench"

if [ $DRY = 1 ]; then
  MODE="dry run on the CPU: cupy-emu, triton interpreter, quick tables, small perf sizes"
  BACKENDS=cupy-emu,torch,triton
  TEST_ARGS="--quick -o ROPE,KV_ROTATE,CPY -p type=f32 -j 2"
  TRITON_TEST_ARGS=$TEST_ARGS
  SCENARIO_PATTERN='split=none,devices=1,.*graph_reuse=on,evict=off,delay=off'
  SCENARIO_ARGS="--layers 4 --steps 2 --time"
  PERF_ARGS="--sizes small --budget-ms 20 --min-samples 3 --no-calibrate"
  FIGURE_ARGS=--dry-run
  LAUNCH_BACKENDS=cupy-emu,torch  # Triton's interpreter would profile Python running a kernel
  LAUNCH_ARGS="--sizes small --calls 20"
  # generous: the dry run checks the plumbing, and shared CI machines can be slow
  T_DOCTOR=180 T_PYTEST=300 T_TEST=300 T_TRITON=300 T_SCEN=180 T_PERF=180 T_FIG=60
  T_REPORT=120 T_LAUNCH=120
else
  MODE="GPU"
  BACKENDS=cupy,torch,triton
  TEST_ARGS="-j 8"
  # Triton compiles a kernel for each new shape and dtype, on a fresh machine every time: the
  # second H200 run got through 595 of its 2,258 cases in 200 s at -j 8 (cupy's and torch's
  # whole tables included). Its quick tables (247 seeded cases, every op and variant) fit;
  # sixteen workers, one per core, compile in parallel.
  TRITON_TEST_ARGS="--quick -j 16"
  SCENARIO_PATTERN='graph_reuse=on,evict=(on|off),delay=off'
  SCENARIO_ARGS="--time"
  PERF_ARGS="--budget-ms 100 --min-samples 20"
  FIGURE_ARGS=
  LAUNCH_BACKENDS=$BACKENDS
  LAUNCH_ARGS="--calls 300"
  # at most 560 s in all: the script fits one 10-minute command. Fourth H200 run: doctor 10 s,
  # pytest-gpu 83 (52 in the third), test 33, test-triton 29 (57), scenario 67, perf 45
  T_DOCTOR=20 T_PYTEST=130 T_TEST=80 T_TRITON=90 T_SCEN=80 T_PERF=80 T_FIG=20 T_REPORT=20
  T_LAUNCH=40
fi

SUMMARY=$OUT/summary.md
FAILED=0
{
  echo "# opbench GPU check ($MODE)"
  echo
  echo "Started $(date -u +%Y-%m-%dT%H:%M:%SZ) at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
  echo
  echo "| step | exit | seconds | log |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

# step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, one summary row.
# Out of time, a step gets SIGINT first (a Ctrl-C: pytest still prints its failures and writes
# its junit XML, opbench keeps every record written), and SIGKILL 20 s later.
step() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS rc
  echo "== $name: $*" >&2
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local verdict=$rc
  [ $rc = 124 ] && verdict="124 (out of time after ${limit}s)"
  [ $rc != 0 ] && FAILED=1
  echo "| $name | $verdict | $((SECONDS - start)) | $name.log |" >> "$SUMMARY"
}

step doctor "$T_DOCTOR" $OB doctor
# not the slow ones: the full tables and the full matrix are the next two steps' work
step pytest-gpu "$T_PYTEST" $PY -m pytest -q -m "gpu and not slow" -p no:cacheprovider -rfE \
  --tb=short --durations=10 tests/backends --junitxml="$OUT/pytest-gpu.xml"
step test "$T_TEST" $OB test -b "${BACKENDS%,triton}" $TEST_ARGS -q --results "$OUT/test.jsonl"
step test-triton "$T_TRITON" $OB test -b triton $TRITON_TEST_ARGS -q --results "$OUT/test.jsonl"
step scenario "$T_SCEN" $OB scenario -b "${BACKENDS/torch,/}" --matrix -p "$SCENARIO_PATTERN" \
  $SCENARIO_ARGS -q --results "$OUT/scenario.jsonl"
step perf "$T_PERF" $OB perf -b "$BACKENDS" -o ROPE,KV_ROTATE,CPY,ATTN $PERF_ARGS \
  --results "$OUT/perf.jsonl"
[ -s "$OUT/perf.jsonl" ] && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" step figures "$T_FIG" \
  $PY benchmarks/gpu_figures.py \
  "$OUT/perf.jsonl" $FIGURE_ARGS
# where the host's time per call goes (the figures' "launch us"): copies and RoPE, profiled
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" step launch "$T_LAUNCH" \
  $PY benchmarks/launch_profile.py -b "$LAUNCH_BACKENDS" $LAUNCH_ARGS --top 12 \
  -c '^(CPY\(type_src=f32,.*perm=\[0,1,2\]|ROPE\(type=f32,.*mode=neox)'
reports=()
for f in test scenario perf; do [ -s "$OUT/$f.jsonl" ] && reports+=("$OUT/$f.jsonl"); done
step report "$T_REPORT" $OB report "${reports[@]}" --baseline torch --out "$OUT/report"

{
  echo
  echo "## What failed"
  echo
  $PY - "$OUT" <<'EOF'
import collections, json, pathlib, sys
from opbench.harness.records import why
out = pathlib.Path(sys.argv[1])
bad = ("FAIL", "ERROR", "CRASH", "TIMEOUT")
found = False
for name in ("test", "scenario", "perf"):
    path = out / f"{name}.jsonl"
    if not path.exists():
        continue
    latest = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a step killed mid-line: the complete lines still count
        latest[(r["backend"], r.get("device"), r["case_id"])] = r
    counts = collections.Counter((r["backend"], r["status"]) for r in latest.values())
    summary = ", ".join(f"{b} {s} {n}" for (b, s), n in sorted(counts.items()))
    print(f"- {name}: {len(latest)} records ({summary})")
    for r in [r for r in latest.values() if r["status"] in bad][:20]:
        found = True
        print(f"  - {r['status']} {r['backend']} {r['case_id']}: {why(r)[:200]}")
if not found:
    print("- no failing record")
EOF
  if [ -s "$OUT/figures.log" ]; then echo; echo "## Figures"; echo; cat "$OUT/figures.log"; fi
  if [ -s "$OUT/launch.log" ]; then
    echo; echo "## Host time per call (launch.log has the profiles)"; echo
    grep -E '^## |^host time per enqueue' "$OUT/launch.log" | paste -d ' ' - - | sed 's/^## /- /'
  fi
  echo
  echo "Finished $(date -u +%Y-%m-%dT%H:%M:%SZ); overall: $([ $FAILED = 0 ] && echo passed || echo FAILED)."
} >> "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
