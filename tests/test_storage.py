"""Loopback S3 (moto's server in a thread), one-line S3 errors, and release publish/fetch."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from dvc.config import Config
from dvc.repo import Repo

from cachelora import releases
from cachelora.errors import CacheloraError
from cachelora.releases import (
    RELEASES_FILE,
    fetch_release,
    publish_release,
    record_release,
    required_digest,
    write_manifest,
)
from cachelora.storage import s3_client
from tests.conftest import S3_DUMMY_CREDENTIALS, LoopbackS3

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
    endpoint: str


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
        with config.edit("local") as conf:
            conf["remote"]["storage"] = local
    return root


def dvc(repo: Path, *args: str) -> str:
    result = subprocess.run([*DVC, *args], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


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
    """moto's S3 server (a thread of this process) with bucket ``cachelora``, and a temp DVC repo
    whose default remote points at it through ``dvc remote modify --local``."""
    repo = make_repo(tmp_path_factory.mktemp("repo"))
    with LoopbackS3(repo) as endpoint:
        yield Server(repo, endpoint)


def test_loopback_s3_has_the_bucket_and_the_local_remote(server: Server) -> None:
    assert server.endpoint.startswith("http://127.0.0.1:")
    assert s3_client(server.repo).list_buckets()["Buckets"][0]["Name"] == "cachelora"
    local = (server.repo / ".dvc" / "config.local").read_text()
    assert f"endpointurl = {server.endpoint}" in local and "access_key_id" in local
    committed = (server.repo / ".dvc" / "config").read_text()
    assert "s3://cachelora/dvc" in committed
    assert "endpointurl" not in committed and "access_key" not in committed and "secret" not in committed


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


# --- one-line S3 errors ------------------------------------------------------------------------

ANY = "0" * 64  # a digest: these fail before any manifest is read


def test_missing_bucket(server: Server, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", "s3://no-such-bucket/dvc", endpointurl=server.endpoint, **S3_DUMMY_CREDENTIALS)
    with pytest.raises(CacheloraError, match=r"^bucket no-such-bucket does not exist at http://127\.0\.0\.1:\d+$"):
        fetch_release("s3://no-such-bucket/releases/v1", tmp_path / "dest", ANY, repo=repo)


def _moto_auth(endpoint: str, count: str) -> None:
    """Switch the moto server's IAM authentication (count 0: enforce; inf: off)."""
    conn = http.client.HTTPConnection(endpoint.removeprefix("http://"), timeout=5)
    try:
        conn.request("POST", "/moto-api/reset-auth", body=count.encode())
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_rejected_credentials(server: Server, tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "repo", endpointurl=server.endpoint, access_key_id="AKIAWRONG", secret_access_key="nope"
    )
    _moto_auth(server.endpoint, "0")
    try:
        with pytest.raises(CacheloraError, match=r"^S3 rejected the credentials for bucket cachelora \(") as err:
            fetch_release("s3://cachelora/releases/v1", tmp_path / "dest", ANY, repo=repo)
    finally:
        _moto_auth(server.endpoint, "inf")
    assert "check .dvc/config.local or AWS_* env" in str(err.value) and "\n" not in str(err.value)
    s3_client(server.repo).head_bucket(Bucket="cachelora")  # authentication is off again


def test_no_credentials(server: Server, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", endpointurl=server.endpoint)
    with pytest.raises(CacheloraError, match=r"^no AWS credentials: set them in \.dvc/config\.local or AWS_\* env$"):
        fetch_release("s3://cachelora/releases/v1", tmp_path / "dest", ANY, repo=repo)


def test_endpoint_down(clean_env: None, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once the socket is closed
    endpoint = f"http://127.0.0.1:{port}"
    repo = make_repo(tmp_path / "repo", endpointurl=endpoint, **S3_DUMMY_CREDENTIALS)
    with pytest.raises(CacheloraError) as err:
        fetch_release("s3://cachelora/releases/v1", tmp_path / "dest", ANY, repo=repo)
    assert str(err.value) == f"cannot reach S3 endpoint {endpoint}: connection refused — is `make s3-local` running?"
    assert not (tmp_path / "dest").exists()


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


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()


def _cli(*args: str) -> Any:
    from cachelora.cli import main

    return CliRunner().invoke(main, [*args])


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
    published = publish_release(release, url + "/", repo=server.repo)
    assert published.url == url and published.manifest_sha256 == _digest(release)
    assert (published.files, published.bytes) == (3, sum(e["size"] for e in manifest["files"]))
    uploaded = ["manifest.json", *(e["path"] for e in manifest["files"])]
    assert _bucket_keys(server, "releases/v1/") == sorted(f"releases/v1/{p}" for p in uploaded)

    dest = tmp_path / "fetched" / "v1"
    fetched = fetch_release(url, dest, published.manifest_sha256.upper(), repo=server.repo)
    assert fetched == [e["path"] for e in manifest["files"]]
    for entry in manifest["files"]:
        assert (dest / entry["path"]).read_bytes() == (release / entry["path"]).read_bytes()
    assert json.loads((dest / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in (tmp_path / "fetched").iterdir()) == ["v1"]  # no temp dir left

    # A consumer without DVC: endpoint and credentials from AWS_* env, outside any DVC repo.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_DUMMY_CREDENTIALS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_DUMMY_CREDENTIALS["secret_access_key"])
    result = _cli("fetch", "--from", url, "--to", "consumer", "--sha256", published.manifest_sha256)
    assert result.exit_code == 0, result.output
    assert published.manifest_sha256 in result.output
    assert (tmp_path / "consumer" / "models" / "merged" / "adapter_model.safetensors").read_bytes() == (
        release / "models" / "merged" / "adapter_model.safetensors"
    ).read_bytes()


def test_fetch_takes_the_digest_from_releases_json(
    server: Server, release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_manifest(release)
    url = "s3://cachelora/releases/recorded"
    published = publish_release(release, url, repo=server.repo)
    assert record_release(server.repo, published) == server.repo / RELEASES_FILE
    records = json.loads((server.repo / RELEASES_FILE).read_text())
    assert records[url] == {
        "manifest_sha256": published.manifest_sha256,
        "files": 3,
        "bytes": published.bytes,
        "published_at": published.published_at,
    }
    assert required_digest(url + "/", None, server.repo) == published.manifest_sha256
    assert required_digest(url, "ab" * 32, server.repo) == "ab" * 32  # --sha256 wins

    # Inside the repo (here: a subdirectory), fetch needs no --sha256.
    (server.repo / "sub").mkdir(exist_ok=True)
    monkeypatch.chdir(server.repo / "sub")
    result = _cli("fetch", "--from", url, "--to", str(tmp_path / "in-repo"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "in-repo" / "README.md").read_text() == "cachelora release\n"

    # Outside it, and with no --sha256, a one-line error; a malformed --sha256 is one too.
    monkeypatch.chdir(tmp_path)
    result = _cli("fetch", "--from", url, "--to", "outside", "--repo", str(server.repo.parent))
    assert result.exit_code == 1 and not (tmp_path / "outside").exists()
    assert result.output.startswith(f"error: no sha256 for {url} (") and result.output.count("\n") == 1
    result = _cli("fetch", "--from", url, "--to", "outside", "--sha256", "abc")
    assert result.exit_code == 1 and result.output == "error: --sha256: expected a sha256 (64 hex digits), got 'abc'\n"
    with pytest.raises(CacheloraError, match=r"not inside the repo\): pass --sha256"):
        required_digest(url, None, None)


def test_publish_makes_only_conditional_puts_manifest_last(
    server: Server, release: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def recording_client(repo: Path | None = None) -> Any:
        client = s3_client(repo)
        client.meta.events.register(
            "provide-client-params.s3.*", lambda params, model, **_: calls.append((model.name, dict(params)))
        )
        return client

    monkeypatch.setattr(releases, "s3_client", recording_client)
    write_manifest(release)
    publish_release(release, "s3://cachelora/releases/cond", repo=server.repo)
    assert [name for name, _ in calls] == ["PutObject"] * 4  # no list, no head: nothing checked, then written
    assert all(params["IfNoneMatch"] == "*" for _, params in calls)
    assert calls[-1][1]["Key"] == "releases/cond/manifest.json"


def test_publish_refuses_an_existing_release(server: Server, release: Path) -> None:
    write_manifest(release)
    url = "s3://cachelora/releases/v2"
    publish_release(release, url, repo=server.repo)
    client = s3_client(server.repo)
    before = {k: client.head_object(Bucket="cachelora", Key=k)["ETag"] for k in _bucket_keys(server, "releases/v2/")}
    (release / "README.md").write_text("changed\n")
    write_manifest(release)
    with pytest.raises(CacheloraError, match=r"^s3://cachelora/releases/v2: a release already exists there") as err:
        publish_release(release, url + "/", repo=server.repo)
    assert "releases are never overwritten" in str(err.value) and "\n" not in str(err.value)
    after = {k: client.head_object(Bucket="cachelora", Key=k)["ETag"] for k in _bucket_keys(server, "releases/v2/")}
    assert before == after


def test_publish_refuses_when_the_manifest_key_is_taken(server: Server, release: Path) -> None:
    """Data objects all new, manifest.json not: the conditional put of the manifest refuses (412)."""
    write_manifest(release)
    client = s3_client(server.repo)
    client.put_object(Bucket="cachelora", Key="releases/race/manifest.json", Body=b"theirs")
    with pytest.raises(CacheloraError, match=r"\(releases/race/manifest\.json is taken\); releases are never overw"):
        publish_release(release, "s3://cachelora/releases/race", repo=server.repo)
    assert client.get_object(Bucket="cachelora", Key="releases/race/manifest.json")["Body"].read() == b"theirs"


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


CONFIG = "models/merged/adapter_config.json"


@pytest.mark.parametrize(
    ("body", "rewrite_manifest", "problem"),
    [
        (b'{"r": 9}\n', False, f"{CONFIG}: sha256 mismatch: expected {{sha}}, got "),  # same size
        (b'{"r": 8, "alpha": 1024}\n', False, f"{CONFIG}: size mismatch: expected 9 bytes, got 24"),
        (None, False, f"{CONFIG}: listed in manifest.json but missing"),
        (b'{"r": 9}\n', True, "manifest.json: sha256 mismatch: expected {digest}, got "),  # entry rewritten too
    ],
    ids=["same-size", "bigger", "deleted", "manifest-rewritten"],
)
def test_fetch_refuses_a_tampered_release(
    server: Server, release: Path, tmp_path: Path, body: bytes | None, rewrite_manifest: bool, problem: str
) -> None:
    manifest = write_manifest(release)
    digest = _digest(release)
    name = f"tamper-{len(body or b'')}-{rewrite_manifest}"
    url = f"s3://cachelora/releases/{name}"
    publish_release(release, url, repo=server.repo)
    client = s3_client(server.repo)
    key = f"releases/{name}/{CONFIG}"
    if body is None:
        client.delete_object(Bucket="cachelora", Key=key)
    else:
        client.put_object(Bucket="cachelora", Key=key, Body=body)
    if rewrite_manifest:  # a consistent forgery: the entry matches the new object
        (release / CONFIG).write_bytes(body)
        client.put_object(
            Bucket="cachelora", Key=f"releases/{name}/manifest.json", Body=json.dumps(write_manifest(release))
        )
    sha = next(e["sha256"] for e in manifest["files"] if e["path"] == CONFIG)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CacheloraError) as err:
        fetch_release(url, out / "v", digest, repo=server.repo)
    assert str(err.value).startswith(f"{url}/{problem.format(sha=sha, digest=digest)}")
    assert "\n" not in str(err.value)
    assert list(out.iterdir()) == []  # neither the target nor a temp dir


def test_fetch_without_manifest(server: Server, tmp_path: Path) -> None:
    s3_client(server.repo).put_object(Bucket="cachelora", Key="releases/half/README.md", Body=b"partial")
    dest = tmp_path / "dest"
    with pytest.raises(CacheloraError, match=r"^no release at s3://cachelora/releases/half: manifest\.json missing$"):
        fetch_release("s3://cachelora/releases/half", dest, ANY, repo=server.repo)
    assert not dest.exists()


def test_fetch_rejects_unsafe_manifest_paths(server: Server, tmp_path: Path) -> None:
    """Even a manifest that matches its digest is checked before any path in it is used."""
    bad = json.dumps({"files": [{"path": "../escape.txt", "sha256": "0" * 64, "size": 1}]}).encode()
    client = s3_client(server.repo)
    client.put_object(Bucket="cachelora", Key="releases/evil/manifest.json", Body=bad)
    digest = hashlib.sha256(bad).hexdigest()
    with pytest.raises(CacheloraError, match=r"files\[0\]: bad path '\.\./escape\.txt'"):
        fetch_release("s3://cachelora/releases/evil", tmp_path / "dest", digest, repo=server.repo)
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
        fetch_release(url, tmp_path / "dest", ANY)


def test_fetch_refuses_existing_dest_and_bad_digests(tmp_path: Path) -> None:
    with pytest.raises(CacheloraError, match="already exists"):
        fetch_release("s3://cachelora/releases/v1", tmp_path, ANY)
    with pytest.raises(CacheloraError, match=r"^sha256: expected a sha256 \(64 hex digits\), got 'xyz'$"):
        fetch_release("s3://cachelora/releases/v1", tmp_path / "dest", "xyz")


def test_fetch_rejects_a_path_that_is_also_a_folder(server: Server, tmp_path: Path) -> None:
    entry = {"sha256": "0" * 64, "size": 1}
    bad = json.dumps({"files": [{"path": "zz", **entry}, {"path": "zz/a", **entry}]}).encode()
    s3_client(server.repo).put_object(Bucket="cachelora", Key="releases/zz/manifest.json", Body=bad)
    with pytest.raises(CacheloraError, match=r"files\[0\]: 'zz' is also listed as a folder of other files"):
        fetch_release("s3://cachelora/releases/zz", tmp_path / "d", hashlib.sha256(bad).hexdigest(), repo=server.repo)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_fetchs_temp_is_removed_by_the_next_fetch(server: Server, release: Path, tmp_path: Path) -> None:
    write_manifest(release)
    url = "s3://cachelora/releases/after-kill"
    publish_release(release, url, repo=server.repo)
    out = tmp_path / "out"
    leftover = out / ".dest.999999999.abc123.tmp"  # the name a fetch in a process now gone would leave
    (leftover / "adapters").mkdir(parents=True)
    (leftover / "adapters" / "half.safetensors").write_bytes(b"x" * 1000)
    fetch_release(url, out / "dest", _digest(release), repo=server.repo)
    assert sorted(p.name for p in out.iterdir()) == ["dest"]


def test_a_write_failure_during_fetch_is_one_line_and_leaves_nothing(
    server: Server, release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_manifest(release)
    url = "s3://cachelora/releases/full-disk"
    publish_release(release, url, repo=server.repo)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cachelora.releases._download", full)
    with pytest.raises(CacheloraError, match=r"dest: fetch failed, nothing written \(No space left on device\)$"):
        fetch_release(url, tmp_path / "out" / "dest", _digest(release), repo=server.repo)
    assert list((tmp_path / "out").iterdir()) == []
