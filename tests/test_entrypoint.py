import errno
import json

import click
from click.testing import CliRunner

from cachelora.entrypoint import user_errors
from cachelora.records import write_json


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text('{"kept": 1}\n')

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_text", full)

    @click.command()
    @user_errors
    def stage() -> None:
        write_json(target, {"new": 2})

    result = CliRunner().invoke(stage, [])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {target}: not written (No space left on device); what was there is kept"
    assert json.loads(target.read_text()) == {"kept": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_an_os_error_outside_a_write_is_one_line_naming_its_file(tmp_path):
    @click.command()
    @user_errors
    def stage() -> None:
        (tmp_path / "missing" / "x.txt").read_text()

    result = CliRunner().invoke(stage, [])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == f"error: {tmp_path / 'missing' / 'x.txt'}: No such file or directory"


def test_peft_offline_base_config_notices_are_not_repeated_to_the_user():
    import warnings

    from cachelora.entrypoint import configure_logging

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        configure_logging()
        warnings.warn("Could not find a config file in all-MiniLM-L6-v2 - will assume ...", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]


def test_ctrl_c_is_one_line_naming_the_restore_command_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"kept": 1}\n')

    @click.command()
    @user_errors
    def stage() -> None:
        from cachelora.records import atomic_path

        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt

    result = CliRunner().invoke(stage, [])
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "`dvc checkout`" in result.output
    assert json.loads(target.read_text()) == {"kept": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
