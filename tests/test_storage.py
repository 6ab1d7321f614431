"""Loopback S3 (a real moto server on 127.0.0.1), remote checks, and release publish/fetch."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from dvc.config import Config
from dvc.repo import Repo

from cachelora.errors import CacheloraError
from cachelora.storage import (
    DUMMY_KEY,
    DUMMY_SECRET,
    STATE_FILE,
    LocalS3,
    _edit_local_remote,
    _free_port,
    _is_moto,
    check_remote,
    fetch_cmd,
    fetch_release,
    publish_release,
    s3,
    s3_client,
    start_local_s3,
    stop_local_s3,
    write_manifest,
)

DVC = [sys.executable, "-m", "dvc"]
AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


@dataclass
class Server:
    repo: Path
    info: LocalS3


def make_repo(root: Path, url: str = "s3://cachelora/dvc", **local: str) -> Path:
    """A DVC repo (no SCM) whose default remote ``storage`` is ``url`` in us-east-1; ``local`` goes
    to .dvc/config.local."""
    root.mkdir(parents=True, exist_ok=True)
    Repo.init(str(root), no_scm=True).close()
    config = Config(dvc_dir=str(root / ".dvc"))
    with config.edit("repo") as conf:
        conf["core"]["remote"] = "storage"
        conf["remote"]["storage"] = {"url": url, "region": "us-east-1"}
    if local:
        _edit_local_remote(root, "storage", local, {})
    return root


def dvc(repo: Path, *args: str) -> str:
    result = subprocess.run([*DVC, *args], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def kill_if_alive(pid: int) -> None:
    if _is_moto(pid):
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.fixture(scope="module", autouse=True)
def clean_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No host AWS or DVC settings leak in; DVC analytics off."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        for name in AWS_VARS:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(home / "aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "aws-credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("DVC_NO_ANALYTICS", "1")
        mp.setenv("DVC_GLOBAL_CONFIG_DIR", str(home / "dvc-global"))
        mp.setenv("DVC_SYSTEM_CONFIG_DIR", str(home / "dvc-system"))
        mp.setenv("DVC_SITE_CACHE_DIR", str(home / "dvc-site-cache"))
        yield


@pytest.fixture(scope="module")
def server(clean_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real moto server for a temp repo, started with ``start_local_s3``; always killed."""
    repo = tmp_path_factory.mktemp("repo")
    dvc(repo, "init", "--no-scm", "-q")
    dvc(repo, "remote", "add", "-d", "storage", "s3://cachelora/dvc")
    dvc(repo, "remote", "modify", "storage", "region", "us-east-1")
    info = start_local_s3(repo)
    try:
        yield Server(repo, info)
    finally:
        try:
            stop_local_s3(repo)
        finally:
            kill_if_alive(info.pid)


def test_start_creates_bucket_and_configures_local_remote(server: Server) -> None:
    assert server.info.bucket == "cachelora" and server.info.endpoint == f"http://127.0.0.1:{server.info.port}"
    assert not server.info.already_running
    check_remote(server.repo)
    assert s3_client(server.repo).list_buckets()["Buckets"][0]["Name"] == "cachelora"
    local = (server.repo / ".dvc" / "config.local").read_text()
    assert f"endpointurl = {server.info.endpoint}" in local and "access_key_id" in local
    committed = (server.repo / ".dvc" / "config").read_text()
    assert "s3://cachelora/dvc" in committed
    assert "endpointurl" not in committed and "access_key" not in committed and "secret" not in committed
    state = json.loads((server.repo / ".dvc" / "tmp" / STATE_FILE).read_text())
    assert state["pid"] == server.info.pid and state["port"] == server.info.port


def test_start_twice_reports_the_running_server(server: Server) -> None:
    again = start_local_s3(server.repo)
    assert again.already_running and (again.pid, again.port) == (server.info.pid, server.info.port)


def test_dvc_push_pull_through_the_local_remote(server: Server) -> None:
    repo = server.repo
    (repo / "data.txt").write_bytes(b"triplets\r\nwith CR bytes\n")
    dvc(repo, "add", "-q", "data.txt")
    dvc(repo, "push")
    keys = [o["Key"] for o in s3_client(repo).list_objects_v2(Bucket="cachelora", Prefix="dvc/")["Contents"]]
    assert keys and all(k.startswith("dvc/files/md5/") for k in keys)
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "data.txt").unlink()
    dvc(repo, "pull")
    assert (repo / "data.txt").read_bytes() == b"triplets\r\nwith CR bytes\n"
    assert "in sync" in dvc(repo, "status", "-c")


def test_missing_bucket(server: Server, tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path,
        "s3://no-such-bucket/dvc",
        endpointurl=server.info.endpoint,
        access_key_id=DUMMY_KEY,
        secret_access_key=DUMMY_SECRET,
    )
    with pytest.raises(CacheloraError, match=r"^bucket no-such-bucket does not exist at http://127\.0\.0\.1:\d+$"):
        check_remote(repo)


def _moto_auth(endpoint: str, count: str) -> None:
    """Switch the running moto server's IAM authentication (count 0: enforce; inf: off)."""
    conn = http.client.HTTPConnection(endpoint.removeprefix("http://"), timeout=5)
    try:
        conn.request("POST", "/moto-api/reset-auth", body=count.encode())
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_rejected_credentials(server: Server, tmp_path: Path) -> None:
    repo = make_repo(tmp_path, endpointurl=server.info.endpoint, access_key_id="AKIAWRONG", secret_access_key="nope")
    _moto_auth(server.info.endpoint, "0")
    try:
        with pytest.raises(CacheloraError, match=r"^S3 rejected the credentials for bucket cachelora \(") as err:
            check_remote(repo)
    finally:
        _moto_auth(server.info.endpoint, "inf")
    assert "check .dvc/config.local or AWS_* env" in str(err.value)
    check_remote(server.repo)  # authentication is off again


def test_no_credentials(server: Server, tmp_path: Path) -> None:
    repo = make_repo(tmp_path, endpointurl=server.info.endpoint)
    with pytest.raises(CacheloraError, match=r"^no AWS credentials: set them in \.dvc/config\.local or AWS_\* env$"):
        check_remote(repo)


def test_cli_start_stop_then_endpoint_down(clean_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    port = _free_port()
    runner = CliRunner()
    state = repo / ".dvc" / "tmp" / STATE_FILE
    result = runner.invoke(s3, ["local", "--port", str(port)])
    pid = json.loads(state.read_text())["pid"] if state.is_file() else None
    try:
        assert result.exit_code == 0, result.output
        assert f"local S3 at http://127.0.0.1:{port}" in result.output and "endpointurl" in result.output
        assert pid is not None and _is_moto(pid)
        again = runner.invoke(s3, ["local"])
        assert again.exit_code == 0 and "already running" in again.output
        stopped = runner.invoke(s3, ["local", "--stop"])
        assert stopped.exit_code == 0 and f"pid {pid}" in stopped.output, stopped.output
    finally:
        if pid is not None:
            kill_if_alive(pid)
    assert not _is_moto(pid) and not state.exists()
    local = repo / ".dvc" / "config.local"
    assert not local.exists() or "endpointurl" not in local.read_text()
    assert "no local S3" in runner.invoke(s3, ["local", "--stop"]).output

    endpoint = f"http://127.0.0.1:{port}"
    _edit_local_remote(repo, "storage", {"endpointurl": endpoint, "access_key_id": "k", "secret_access_key": "s"}, {})
    expected = f"cannot reach S3 endpoint {endpoint}: connection refused — is `cachelora s3 local` running?"
    with pytest.raises(CacheloraError) as err:
        check_remote(repo)
    assert str(err.value) == expected


# --- releases ----------------------------------------------------------------------------------


@pytest.fixture
def release(tmp_path: Path) -> Path:
    folder = tmp_path / "release"
    (folder / "models" / "merged").mkdir(parents=True)
    (folder / "README.md").write_text("cachelora release\n")
    (folder / "models" / "merged" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4 + b"\r\n")
    (folder / "models" / "merged" / "adapter_config.json").write_text('{"r": 8}\n')
    return folder


def _bucket_keys(server: Server, prefix: str) -> list[str]:
    response = s3_client(server.repo).list_objects_v2(Bucket="cachelora", Prefix=prefix)
    return sorted(o["Key"] for o in response.get("Contents", []))


def test_write_manifest(release: Path) -> None:
    manifest = write_manifest(release)
    paths = [e["path"] for e in manifest["files"]]
    assert paths == ["README.md", "models/merged/adapter_config.json", "models/merged/adapter_model.safetensors"]
    blob = manifest["files"][2]
    assert blob["size"] == 1026 and len(blob["sha256"]) == 64
    assert json.loads((release / "manifest.json").read_text()) == manifest
    assert write_manifest(release) == manifest  # manifest.json never lists itself


def test_publish_fetch_round_trip(
    server: Server, release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_manifest(release)
    url = "s3://cachelora/releases/v1"
    uploaded = publish_release(release, url, repo=server.repo)
    assert uploaded[-1] == "manifest.json" and len(uploaded) == 4
    assert _bucket_keys(server, "releases/v1/") == sorted(f"releases/v1/{p}" for p in uploaded)

    dest = tmp_path / "fetched" / "v1"
    assert fetch_release(url, dest, repo=server.repo) == [e["path"] for e in manifest["files"]]
    for entry in manifest["files"]:
        assert (dest / entry["path"]).read_bytes() == (release / entry["path"]).read_bytes()
    assert json.loads((dest / "manifest.json").read_text()) == manifest

    # A consumer without DVC: endpoint and credentials from AWS_* env, outside any DVC repo.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.info.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET)
    result = CliRunner().invoke(fetch_cmd, ["--from", url, "--to", "consumer"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "consumer" / "models" / "merged" / "adapter_model.safetensors").read_bytes() == (
        release / "models" / "merged" / "adapter_model.safetensors"
    ).read_bytes()


def test_publish_refuses_an_existing_release(server: Server, release: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_manifest(release)
    url = "s3://cachelora/releases/v2"
    assert len(publish_release(release, url, repo=server.repo)) == 4
    before = s3_client(server.repo).head_object(Bucket="cachelora", Key="releases/v2/README.md")["ETag"]
    (release / "README.md").write_text("changed\n")
    write_manifest(release)
    with pytest.raises(CacheloraError, match=r"^s3://cachelora/releases/v2/?: a release already exists there"):
        publish_release(release, url + "/", repo=server.repo)
    after = s3_client(server.repo).head_object(Bucket="cachelora", Key="releases/v2/README.md")["ETag"]
    assert before == after


def test_publish_verifies_files_against_the_manifest(server: Server, release: Path) -> None:
    write_manifest(release)
    (release / "README.md").write_text("edited after the manifest\n")
    with pytest.raises(CacheloraError, match=r"README\.md: size mismatch: expected 18 bytes, got 26"):
        publish_release(release, "s3://cachelora/releases/bad", repo=server.repo)
    (release / "extra.txt").write_text("x")
    write_manifest(release)
    (release / "late.txt").write_text("y")
    with pytest.raises(CacheloraError, match=r"late\.txt: not listed in manifest\.json"):
        publish_release(release, "s3://cachelora/releases/bad", repo=server.repo)
    assert _bucket_keys(server, "releases/bad/") == []


def test_fetch_refuses_a_tampered_object(server: Server, release: Path, tmp_path: Path) -> None:
    manifest = write_manifest(release)
    url = "s3://cachelora/releases/v3"
    publish_release(release, url, repo=server.repo)
    key = "releases/v3/models/merged/adapter_config.json"
    s3_client(server.repo).put_object(Bucket="cachelora", Key=key, Body=b'{"r": 9}\n')  # same size
    expected = next(e["sha256"] for e in manifest["files"] if e["path"].endswith("adapter_config.json"))
    dest = tmp_path / "out" / "v3"
    with pytest.raises(CacheloraError) as err:
        fetch_release(url, dest, repo=server.repo)
    message = str(err.value)
    assert message.startswith(f"{url}/models/merged/adapter_config.json: sha256 mismatch: expected {expected}, got ")
    assert not dest.exists() and list((tmp_path / "out").iterdir()) == []


def test_fetch_without_manifest(server: Server, tmp_path: Path) -> None:
    s3_client(server.repo).put_object(Bucket="cachelora", Key="releases/half/README.md", Body=b"partial")
    dest = tmp_path / "dest"
    with pytest.raises(CacheloraError, match=r"^no release at s3://cachelora/releases/half: manifest\.json missing$"):
        fetch_release("s3://cachelora/releases/half", dest, repo=server.repo)
    assert not dest.exists()


def test_fetch_rejects_unsafe_manifest_paths(server: Server, tmp_path: Path) -> None:
    bad = {"files": [{"path": "../escape.txt", "sha256": "0" * 64, "size": 1}]}
    client = s3_client(server.repo)
    client.put_object(Bucket="cachelora", Key="releases/evil/manifest.json", Body=json.dumps(bad).encode())
    with pytest.raises(CacheloraError, match=r"files\[0\]: bad path '\.\./escape\.txt'"):
        fetch_release("s3://cachelora/releases/evil", tmp_path / "dest", repo=server.repo)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "dest").exists()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("cachelora/releases/v1", "not an S3 URL"),
        ("s3:///releases", "no bucket"),
        ("s3://cachelora", "a release needs a prefix"),
    ],
)
def test_release_urls_are_checked(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(CacheloraError, match=message):
        fetch_release(url, tmp_path / "dest")


def test_fetch_refuses_existing_dest(tmp_path: Path) -> None:
    with pytest.raises(CacheloraError, match="already exists"):
        fetch_release("s3://cachelora/releases/v1", tmp_path)
