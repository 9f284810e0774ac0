#!/usr/bin/env bash
# Mutation testing with mutmut 3 over the modules where a silent bug costs users most.
#
#   scripts/mutation.sh                    mutate every module in MODULES, run, print survivors and the table
#   scripts/mutation.sh MODULE...          (re)run only these modules (paths as in MODULES); others keep results
#   scripts/mutation.sh --fresh [MODULE...]  forget earlier results (removes mutants/) first
#   scripts/mutation.sh --report           only print survivors and the per-module table of what has run
#   scripts/mutation.sh --mutmut ARGS...   any mutmut command with this module list, e.g. --mutmut show NAME
#
# Slow (about an hour on 2 cores for all modules): run by hand, never in CI; pytest collects nothing from here.
# A run without MODULE arguments resumes: mutants with a result are not run again unless their function changed.
# The tests that may kill a mutant (a fast subset) and the timeouts are [tool.mutmut] in pyproject.toml; mutmut
# runs, for each mutant, only the tests of that subset that call the mutated function, fastest first, up to the
# first failure. mutmut works on a copy of the project in mutants/ (ignored by git).
#
# Environment: VENV (virtualenv to use, default .venv), JOBS (mutants tested in parallel, default: CPU count).
set -euo pipefail

# The modules to mutate, as paths from the repository root. Edit this list when modules move.
MODULES=(
    flexisearch/sampling/schedule.py   # patch-size schedules
    flexisearch/sampling/generate.py   # generation: the denoising loop and the prefix cache
    flexisearch/models/flops.py        # FLOP counts
    flexisearch/models/layers.py       # flexible layers
    flexisearch/optimize/evaluate.py     # the trial evaluation and constraints
    flexisearch/optimize/spaces.py       # search spaces
    flexisearch/optimize/export.py       # results export
)

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
JOBS=${JOBS:-$(nproc)}
[ -x "$PY" ] || { echo "mutation.sh: no python at $PY (set VENV=path/to/venv, or run scripts/venv.sh)" >&2; exit 2; }
"$PY" - <<'EOF' 2>/dev/null || "$PY" -m pip install -q "mutmut>=3.8,<4"
import importlib.metadata, sys
major, minor = (int(x) for x in importlib.metadata.version("mutmut").split(".")[:2])
sys.exit(not (major == 3 and minor >= 8))
EOF

for m in "${MODULES[@]}"; do
    [ -f "$m" ] || { echo "mutation.sh: module $m not found: update MODULES at the top of $0" >&2; exit 2; }
done

fresh=0; report_only=0; passthrough=0; selected=()
while [ $# -gt 0 ]; do
    case "$1" in
        --fresh) fresh=1 ;;
        --report) report_only=1 ;;
        --mutmut) passthrough=1; shift; break ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) echo "mutation.sh: unknown option $1" >&2; exit 2 ;;
        *) [[ " ${MODULES[*]} " == *" $1 "* ]] || { echo "mutation.sh: $1 is not in MODULES" >&2; exit 2; }
           selected+=("$1") ;;
    esac
    shift
done

export MUTATION_MODULES="${MODULES[*]}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # one thread per mutant worker; JOBS workers in parallel
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled PYTHONDONTWRITEBYTECODE=1

# mutmut with only_mutate set to MODULES (mutmut reads it only from its config file; the list lives here).
mutmut() {
    "$PY" - "$@" <<'EOF'
import os
import sys

from mutmut.configuration import config

cfg = config()
assert hasattr(cfg, "only_mutate"), "mutmut's configuration changed: update scripts/mutation.sh"
cfg.only_mutate = os.environ["MUTATION_MODULES"].split()
from mutmut.__main__ import cli  # noqa: E402

cli(sys.argv[1:], prog_name="mutmut")
EOF
}

if [ $passthrough = 1 ]; then
    mutmut "$@"; exit
fi

# A changed module list invalidates mutants/: mutmut would keep stale plain copies of newly listed modules.
if [ $fresh = 1 ] || { [ -d mutants ] && [ "$(cat mutants/.mutation-modules 2>/dev/null)" != "$MUTATION_MODULES" ]; }; then
    rm -rf mutants
fi

if [ $report_only = 0 ]; then
    start=$(date +%s)
    globs=()
    for m in "${selected[@]}"; do  # mutant names are module.x_function__mutmut_N or module.xǁClassǁmethod__mutmut_N
        mod=${m%.py}; mod=${mod//\//.}; mod=${mod%.__init__}
        globs+=("$mod.x_*" "$mod.xǁ*")
    done
    mkdir -p mutants && printf '%s' "$MUTATION_MODULES" > mutants/.mutation-modules
    mutmut run --max-children "$JOBS" "${globs[@]}"
    # Package data must be in the copy, or tests would fail (or pass) for the wrong reason.
    missing=$(git ls-files -- "${MODULES[0]%%/*}" | grep -v '\.py$' | while read -r f; do
        [ -e "mutants/$f" ] || echo "$f"; done)
    [ -z "$missing" ] || { echo "mutation.sh: package data missing from mutants/: $missing" >&2; exit 1; }
    echo "mutation.sh: mutmut finished in $(( $(date +%s) - start )) s"
fi

"$PY" - <<'EOF'
"""Survivors (file:line, original -> mutant) and the per-module table, from mutmut's mutants/*.meta files."""
import ast
import difflib
import json
import os
from pathlib import Path

import libcst as cst
from mutmut.mutation.diff_apply import read_functions_from_index
from mutmut.stats import status_by_exit_code
from mutmut.utils.format_utils import orig_function_and_class_names_from_key


def def_line(module: ast.Module, func: str, cls: str | None) -> int | None:
    """Line of `def func` (a top-level function, or a method of top-level class cls)."""
    body = module.body
    if cls is not None:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == cls), [])
    return next((n.lineno for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == func),
                None)


def describe(name: str, path: str, tree: ast.Module) -> str:
    """'path:line: original  ->  mutant' of the first line the mutation changes."""
    try:
        funcs = read_functions_from_index(name, path)
        orig, mutant = (cst.Module([]).code_for_node(f).splitlines() for f in funcs)
    except Exception as e:  # noqa: BLE001  (no index: report the name only)
        return f"{path}: {name} ({type(e).__name__})"
    func, cls = orig_function_and_class_names_from_key(name)
    first = next(i for i, line in enumerate(orig) if line.lstrip().startswith(("def ", "async def ")))
    sm = difflib.SequenceMatcher(a=orig, b=mutant, autojunk=False)
    op = next((op for op in sm.get_opcodes() if op[0] != "equal"), None)
    start = def_line(tree, func, cls)
    if op is None or start is None:
        return f"{path}: {name}"
    _, i1, i2, j1, j2 = op
    line = start + i1 - first
    a = " / ".join(s.strip() for s in orig[i1:i2]) or "(nothing)"
    b = " / ".join(s.strip() for s in mutant[j1:j2]) or "(removed)"
    return f"{path}:{line}: {a}  ->  {b}"


modules = os.environ["MUTATION_MODULES"].split()
columns = ["killed", "survived", "no tests", "timeout", "not checked"]
rows, survivors = [], {}
for path in modules:
    meta = Path("mutants") / (path + ".meta")
    codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    counts = dict.fromkeys(columns + ["other"], 0)
    for name, code in codes.items():
        status = status_by_exit_code[code]
        if status == "caught by type check":
            status = "killed"
        counts[status if status in counts else "other"] += 1
        if status in ("survived", "no tests"):
            survivors.setdefault(path, []).append((name, status))
    rows.append((path, len(codes), counts))

print("\nSurviving mutants (and mutants no selected test calls), by module:")
for path in modules:
    tree = ast.parse(Path(path).read_text())
    entries = survivors.get(path, [])
    print(f"\n{path}: {len(entries)}")
    for name, status in sorted(entries, key=lambda e: (e[0].rsplit("__mutmut_", 1)[0], int(e[0].rsplit("_", 1)[1]))):
        print(f"  {'[no tests] ' if status == 'no tests' else ''}{describe(name, path, tree)}    [{name}]")


def score(total: int, c: dict) -> str:
    tested = total - c["not checked"] - c["other"]
    return f"{100 * (c['killed'] + c['timeout']) / tested:.1f}%" if tested else "-"


header = ["module", "mutants", "killed", "survived", "no tests", "timeout", "not run", "other", "score"]
table = [[p, str(n), *(str(c[k]) for k in columns), str(c["other"]), score(n, c)] for p, n, c in rows]
sums = {k: sum(c[k] for _, _, c in rows) for k in columns + ["other"]}
total = sum(n for _, n, _ in rows)
table.append(["TOTAL", str(total), *(str(sums[k]) for k in columns), str(sums["other"]), score(total, sums)])
widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
print("\nPer-module mutation score = (killed + timeout) / (mutants - not run - other); 'no tests' counts as survived.")
for i, r in enumerate([header, *table]):
    print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
    if i == 0 or i == len(table) - 1:
        print("  ".join("-" * w for w in widths))
EOF
