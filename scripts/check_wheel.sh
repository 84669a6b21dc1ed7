#!/usr/bin/env bash
# The package as a user gets it: build the wheel with `python -m build`, install it into a fresh
# virtual environment (no editable install, no source tree on the path), and run `dk` from there:
# `dk --version`, `dk list`, and `dk run` of the shipped quickstart recipe (read from the wheel's
# package data) on a small budget. Exits non-zero on the first failure.
#
# Usage: bash scripts/check_wheel.sh [WORKDIR]   (default: a new temporary folder, removed at exit)
# torch: the fresh environment gets torch from the package index (DK_TORCH_VERSION, default
# 2.13.0; DK_TORCH_INDEX for the CPU build elsewhere), like scripts/setup.sh.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
if [ -n "${1:-}" ]; then
  work="$1"; mkdir -p "$work"
else
  work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
fi
say() { echo "check_wheel: $*" >&2; }

say "building the wheel"
"$PY" -m build --wheel --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
wheel="$(ls "$work"/dist/darkknowledge-*.whl)"
say "built $(basename "$wheel")"
# the recipes and bench suites travel as package data
"$PY" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["darkknowledge/recipes/quickstart.yaml", "darkknowledge/recipes/lm.yaml"]
missing = [n for n in need if n not in names]
suites = [n for n in names if n.startswith("darkknowledge/bench/suites/") and n.endswith(".yaml")]
if missing or not suites:
    sys.exit(f"check_wheel: the wheel lacks {missing or 'the bench suites'}")
if any(n.startswith(("tests/", "benchmarks/")) for n in names):
    sys.exit("check_wheel: the wheel carries tests or benchmarks")
print(f"check_wheel: {len(names)} files, recipes and {len(suites)} bench suites included", file=sys.stderr)
EOF

say "installing into a fresh virtual environment"
"$PY" -m venv "$work/venv"
vpy="$work/venv/bin/python"
"$vpy" -m pip install --quiet --disable-pip-version-check \
  "torch==${DK_TORCH_VERSION:-2.13.0}" ${DK_TORCH_INDEX:+--index-url "$DK_TORCH_INDEX"}
"$vpy" -m pip install --quiet --disable-pip-version-check "$wheel"

# run from an empty folder, so nothing of the source tree can be imported by accident
mkdir -p "$work/user" && cd "$work/user"
export DK_CACHE="$work/cache"  # nothing from an earlier run (generated data, trained teachers) is reused
where="$("$vpy" -c 'import darkknowledge, os; print(os.path.dirname(darkknowledge.__file__))')"
case "$where" in
  "$work/venv/"*) ;;
  *) say "darkknowledge imports from $where, not from the fresh environment"; exit 1 ;;
esac
dk="$work/venv/bin/dk"
"$dk" --version
"$dk" list >/dev/null
say "dk run quickstart (small budget)"
"$dk" run quickstart --out "$work/user/run" --quiet seeds='[0]' \
  data.params.num_samples=1000 data.params.transfer_samples=0 teacher.train.epochs=2 train.epochs=2
test -s "$work/user/run/report.md" || { say "dk run wrote no report.md"; exit 1; }
grep -q "student" "$work/user/run/report.md" || { say "report.md has no student row"; exit 1; }
say "ok: the wheel installs in a fresh environment and dk run works from it"
