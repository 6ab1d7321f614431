import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cachelora.errors import CacheloraError
from cachelora.records import (
    atomic_dir,
    atomic_path,
    read_json,
    read_jsonl,
    read_yaml,
    remove_stale_temps,
    write_json,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]


def test_write_then_read_round_trip(tmp_path):
    rows = [{"anchor": "a1", "positive": "p1", "negative": "n1"}, {"anchor": "ä", "positive": "p", "negative": "n"}]
    assert write_jsonl(tmp_path / "x.jsonl", rows) == 2
    assert read_jsonl(tmp_path / "x.jsonl") == rows


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"anchor": "a"}\n\n{"anchor": \n')
    with pytest.raises(CacheloraError, match=r"bad.jsonl:3: malformed JSON"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"anchor": NaN}', "NaN is not a number JSON allows"),
        ('{"threshold": -Infinity}', "-Infinity is not a number JSON allows"),
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ],
)
def test_nan_infinity_and_deep_nesting_are_malformed_json(tmp_path, line, reason):
    (tmp_path / "x.jsonl").write_text('{"ok": 1}\n' + line + "\n")
    with pytest.raises(CacheloraError, match=rf"x.jsonl:2: malformed JSON \({reason}\)"):
        read_jsonl(tmp_path / "x.jsonl")
    (tmp_path / "x.json").write_text(line)
    with pytest.raises(CacheloraError, match=rf"x.json: malformed JSON \({reason}\)"):
        read_json(tmp_path / "x.json")


def test_line_numbers_count_newlines_only(tmp_path):
    """A U+2028 inside a text is not a line break for JSONL: the error names the file's own line."""
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"anchor": "one\u2028two"}, ensure_ascii=False) + "\n\n{bad\n", encoding="utf-8")
    with pytest.raises(CacheloraError, match=r"x.jsonl:3: malformed JSON"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, r"p.yaml: prompt file not found$"),
        ("a: [1,\n", r"p.yaml: malformed YAML \(while parsing .*\)$"),
        ("- a\n- b\n", r"p.yaml: expected a mapping with keys system, user$"),
        ("", r"p.yaml: expected a mapping with keys system, user$"),
        ("system: a\nuser: b\nsystem: c\n", r"p.yaml: malformed YAML .*key 'system' appears twice.*line 3"),
        ("system: {x: 1, x: 2}\nuser: u\n", r"p.yaml: malformed YAML .*key 'x' appears twice"),
    ],
)
def test_yaml_problems_are_one_line_errors_naming_the_file(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(CacheloraError, match=message) as err:
        read_yaml(path, keys=("system", "user"), missing="prompt file not found")
    assert "\n" not in str(err.value)


def test_yaml_mapping_is_returned(tmp_path):
    (tmp_path / "p.yaml").write_text("system: s\nuser: u\n")
    assert read_yaml(tmp_path / "p.yaml") == {"system": "s", "user": "u"}


def test_failed_write_leaves_no_file(tmp_path):
    def rows():
        yield {"a": 1}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(tmp_path / "out.jsonl", rows())
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "splits"
    with atomic_dir(target) as tmp:
        (tmp / "train.jsonl").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "train.jsonl").write_text("new")
        raise RuntimeError("interrupted")
    assert (target / "train.jsonl").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["splits"]


KILLED_WRITER = """
import sys, time
from pathlib import Path
from cachelora.records import atomic_dir, atomic_path
target, kind = Path(sys.argv[1]), sys.argv[2]
with (atomic_dir if kind == "dir" else atomic_path)(target) as tmp:
    (tmp / "train.jsonl" if kind == "dir" else tmp).write_text("half of it")
    print("writing", flush=True)
    time.sleep(120)
"""


def kill_mid_write(target: Path, kind: str) -> int:
    """Start a writer of ``target``, SIGKILL it mid-write (no cleanup runs), and return its pid."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), kind], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.pid


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_killed_writers_temp_is_removed_when_the_target_is_written_again(tmp_path, kind):
    target = tmp_path / ("splits" if kind == "dir" else "eval.json")
    pid = kill_mid_write(target, kind)
    leftovers = list(tmp_path.glob(f".{target.name}.{pid}.*.tmp"))
    assert len(leftovers) == 1 and not target.exists()
    other_target = tmp_path / f".{target.name}.json.{pid}.abcd1234.tmp"  # a temp of "<name>.json", not ours
    other_target.write_text("not ours")
    if kind == "dir":
        with atomic_dir(target) as tmp:
            (tmp / "train.jsonl").write_text("complete")
        assert (target / "train.jsonl").read_text() == "complete"
    else:
        write_json(target, {"complete": True})
        assert json.loads(target.read_text()) == {"complete": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, other_target.name])


def test_only_temps_of_gone_processes_are_stale(tmp_path):
    target = tmp_path / "eval.json"
    live = [f".eval.json.{os.getppid()}.live0001.tmp", f".eval.json.{os.getpid()}.thread01.tmp"]
    stale = [f".eval.json.{dead_pid()}.dead0001.tmp", ".eval.json.nopid001.tmp"]  # the second: an older name
    others = ["eval.json.tmp", ".eval.jsonl.123.abcd1234.tmp", ".eval.json.123.x.y.tmp"]
    for name in live + stale + others:
        (tmp_path / name).write_text("")
    (tmp_path / stale[0]).unlink()
    (tmp_path / stale[0]).mkdir()  # a directory temp (atomic_dir) with content
    (tmp_path / stale[0] / "part").write_text("")
    assert sorted(p.name for p in remove_stale_temps(target)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(live + others)


def test_temp_names_are_ignored_by_git_and_dvc(tmp_path):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    with atomic_path(tmp_path / "eval.json") as tmp_file, atomic_dir(tmp_path / "medical") as tmp_dir:
        names = [f"metrics/{tmp_file.name}", f"data/splits/{tmp_dir.name}/train.jsonl", f"models/{tmp_dir.name}"]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for command in (["git", "check-ignore"], [sys.executable, "-m", "dvc", "check-ignore"]):
        result = subprocess.run([*command, *names], cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.stdout.split() == names, f"{command[-2]} does not ignore {names}: {result.stderr}"
        kept = subprocess.run([*command, "data/seed/medical.yaml"], cwd=ROOT, env=env, capture_output=True)
        assert kept.returncode == 1  # and a real file is not ignored


def test_non_utf8_and_empty_files_are_one_line_errors(tmp_path):
    from cachelora.evaluation import evaluation_rows

    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"anchor": "ok", "positive": "fine", "negative": "good"}\n{"anchor": "caf\xe9"}\n')
    with pytest.raises(CacheloraError, match=r"latin1.jsonl:2: not UTF-8 text"):
        read_jsonl(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CacheloraError, match=r"empty.jsonl: 0 rows, fewer than evaluate.min_rows \(5\)"):
        evaluation_rows(empty, 5)
