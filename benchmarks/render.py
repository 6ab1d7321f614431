"""Render benchmarks/results/*.json as the README's "Performance" section (markdown).

Each result file carries a ``headline`` list of {figure, value}; every row names its file.
``--write-readme`` replaces the block between the perf markers in README.md (atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
ORDER = ("train", "evaluate", "pipeline", "setup")


def render_perf(results_dir: str | Path) -> str:
    """A markdown table (no heading) of every result file's headline figures, with the file each comes from."""
    results_dir = Path(results_dir)
    files = sorted(results_dir.glob("*.json"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    if not files:
        return f"(no results in {results_dir}; run `make bench`)\n"
    lines = ["| benchmark | figure | value | source |", "|---|---|---|---|"]
    notes = []
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        source = path.relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
        name = data.get("benchmark", path.stem) + (" (quick)" if data.get("quick") else "")
        lines += [f"| {name} | {h['figure']} | {h['value']} | `{source}` |" for h in data.get("headline", [])]
        if data.get("created"):
            notes.append(f"{path.name}: {data['created']}")
    return "\n".join([*lines, "", f"Measured by `benchmarks/` ({'; '.join(notes)}).", ""])


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between the perf markers replaced by ``block``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"README.md: markers {BEGIN} ... {END} not found")
    return f"{text[: start + len(BEGIN)]}\n{block}{text[end:]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--write-readme", action="store_true", help="replace the perf block in README.md")
    opts = parser.parse_args()
    block = render_perf(opts.results)
    if not opts.write_readme:
        sys.stdout.write(f"## Performance\n\n{block}")
        return
    from cachelora.records import write_text

    readme = REPO / "README.md"
    write_text(readme, replace_block(readme.read_text(encoding="utf-8"), block))
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
