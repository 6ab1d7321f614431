"""README and docs stay self-contained and current: every dvc.yaml stage is in README's pipeline
diagram and stage table, nothing tracked points outside the repo, and every relative link resolves."""

import re
import subprocess
from pathlib import Path

import yaml

README = Path("README.md")
DOCS = sorted(Path("docs").glob("*.md"))
STAGES = list(yaml.safe_load(Path("dvc.yaml").read_text())["stages"])
# Spelled in parts so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"\b" + "design".upper() + r"\b", re.escape("../" + "shared")]))
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def section(text: str, heading: str) -> str:
    """The part of ``text`` under the level-2 ``heading``, up to the next level-2 heading."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def diagram_stages(pipeline: str) -> set[str]:
    """Stage names labelling the arrows (``──name@item, name@other──▶``) of the section's first code block."""
    diagram = pipeline.split("```", 2)[1]
    labels = re.findall(r"──([^─▶]+)──▶", diagram)
    return {part.strip().split("@")[0] for label in labels for part in label.split(",")}


def table_stages(pipeline: str) -> set[str]:
    """First-column names of the section's ``| stage | ... |`` table (``generate@<domain>`` -> generate)."""
    lines = pipeline.splitlines()
    start = next(i for i, line in enumerate(lines) if line.replace(" ", "").startswith("|stage|"))
    names = set()
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        names.add(line.split("|")[1].strip().strip("`").split("@")[0])
    return names


def test_every_dvc_stage_is_in_the_readme_diagram_and_table():
    pipeline = section(README.read_text(encoding="utf-8"), "Pipeline")
    for found, where in ((diagram_stages(pipeline), "diagram"), (table_stages(pipeline), "stage table")):
        assert not set(STAGES) - found, f"README's pipeline {where} lacks {sorted(set(STAGES) - found)}"
        assert not found - set(STAGES), (
            f"README's pipeline {where} names no dvc.yaml stage {sorted(found - set(STAGES))}"
        )


def test_nothing_tracked_points_outside_the_repo():
    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.decode().split("\0")
    offenders = []
    for name in filter(None, tracked):
        path = Path(name)
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def relative_links(path: Path) -> list[str]:
    """Link targets in ``path`` outside code, without URLs, mail links and in-page anchors."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]
    return [t.split("#", 1)[0] for t in targets]


def test_relative_links_in_readme_and_docs_resolve():
    assert Path("docs/metrics.md") in DOCS
    missing = [
        f"{path}: {target}"
        for path in [README, *DOCS]
        for target in relative_links(path)
        if not (path.parent / target).exists()
    ]
    assert not missing, missing
    assert "docs/metrics.md" in relative_links(README)
