"""S3 storage: a loopback S3 (moto) for development, friendly remote checks, and release bundles.

Release bundles are plain S3 prefixes holding the files plus a ``manifest.json`` (path, sha256,
size of each); consumers need only boto3. The manifest is uploaded last, so a half-uploaded
release has none and ``fetch_release`` refuses it.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import click

from cachelora.entrypoint import user_errors
from cachelora.errors import CacheloraError
from cachelora.records import atomic_dir, file_sha256, read_json, write_json

HOST = "127.0.0.1"
DEFAULT_REGION = "us-east-1"
DUMMY_KEY = "testing"
DUMMY_SECRET = "testing"  # moto accepts any credentials
MANIFEST = "manifest.json"
STATE_FILE = "s3-local.json"
LOG_FILE = "s3-local.log"
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
_AUTH_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Remote:
    """A repo's default DVC remote: name, url, bucket and its (merged) options."""

    name: str
    url: str
    bucket: str
    options: dict[str, Any]


@dataclass(frozen=True)
class LocalS3:
    """A running loopback S3 server and the remote it was configured for."""

    endpoint: str
    port: int
    pid: int
    bucket: str
    remote: str
    already_running: bool = False


# --- URLs and DVC config -----------------------------------------------------------------------


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` as (bucket, "some/prefix"); anything else is an error."""
    if not url.startswith("s3://"):
        raise CacheloraError(f"{url}: not an S3 URL (expected s3://BUCKET/PREFIX)")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise CacheloraError(f"{url}: no bucket (expected s3://BUCKET/PREFIX)")
    return bucket, prefix.strip("/")


def _dvc_config(repo: Path) -> Any:
    """The repo's merged DVC config (system, global, repo, local), as DVC reads it."""
    from dvc.config import Config, ConfigError

    dvc_dir = Path(repo) / ".dvc"
    if not dvc_dir.is_dir():
        raise CacheloraError(f"{repo}: not a DVC repository (no .dvc/)")
    try:
        return Config(dvc_dir=str(dvc_dir))
    except ConfigError as exc:
        raise CacheloraError(f"{dvc_dir}: invalid DVC config ({exc})") from None


def default_remote(repo: Path) -> Remote:
    """The repo's default DVC remote, which must be S3."""
    conf = _dvc_config(repo)
    name = conf["core"].get("remote")
    if not name:
        raise CacheloraError(f"{repo}: no default DVC remote (dvc remote add -d storage s3://BUCKET/PREFIX)")
    options = dict(conf["remote"].get(name, {}))
    url = str(options.get("url", ""))
    if not url.startswith("s3://"):
        raise CacheloraError(f"{repo}: default DVC remote '{name}' is not S3 (url '{url}')")
    return Remote(name=name, url=url, bucket=split_s3_url(url)[0], options=options)


def s3_client(repo: Path | None = None) -> Any:
    """A boto3 S3 client with the endpoint, region and credentials DVC would use for ``repo``'s
    default remote; with no repo (or no such settings) boto3's default chain (AWS_* env,
    AWS_ENDPOINT_URL, ~/.aws) decides."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    opts = default_remote(repo).options if repo is not None else {}
    try:
        session = boto3.Session(
            aws_access_key_id=opts.get("access_key_id"),
            aws_secret_access_key=opts.get("secret_access_key"),
            aws_session_token=opts.get("session_token"),
            region_name=opts.get("region"),
            profile_name=opts.get("profile"),
        )
        return session.client(
            "s3",
            endpoint_url=opts.get("endpointurl"),
            config=Config(connect_timeout=5, read_timeout=60, retries={"mode": "standard", "max_attempts": 3}),
        )
    except BotoCoreError as exc:
        raise CacheloraError(f"cannot set up an S3 client: {exc}") from None


# --- friendly errors ---------------------------------------------------------------------------


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _unreachable_reason(exc: BaseException) -> str:
    """'connection refused', 'timed out' or 'unreachable', from the exception's causes."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or "refused" in str(seen).lower():
            return "connection refused"
        if isinstance(seen, TimeoutError) or "timed out" in str(seen).lower():
            return "timed out"
        seen = getattr(seen, "kwargs", {}).get("error") or seen.__cause__ or seen.__context__
    return "unreachable"


@contextmanager
def _s3_errors(client: Any, bucket: str) -> Iterator[None]:
    """Turn boto3/botocore failures into one-line CacheloraErrors naming endpoint and bucket."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    endpoint = client.meta.endpoint_url
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError):
        raise CacheloraError("no AWS credentials: set them in .dvc/config.local or AWS_* env") from None
    except ConnectionError as exc:
        hint = " — is `cachelora s3 local` running?" if ("127.0.0.1" in endpoint or "localhost" in endpoint) else ""
        raise CacheloraError(f"cannot reach S3 endpoint {endpoint}: {_unreachable_reason(exc)}{hint}") from None
    except ClientError as exc:
        code = _error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _AUTH_CODES or status == 403:
            detail = "" if code == "403" else f"{code}; "
            raise CacheloraError(
                f"S3 rejected the credentials for bucket {bucket} ({detail}check .dvc/config.local or AWS_* env)"
            ) from None
        if code in ("404", "NoSuchBucket"):
            raise CacheloraError(f"bucket {bucket} does not exist at {endpoint}") from None
        message = exc.response.get("Error", {}).get("Message", "")
        raise CacheloraError(f"S3 error for bucket {bucket} at {endpoint}: {code} {message}".rstrip()) from None
    except (BotoCoreError, Boto3Error) as exc:
        raise CacheloraError(f"S3 request to {endpoint} failed: {exc}") from None


def check_remote(repo: Path) -> None:
    """Check that the repo's default S3 remote answers with these credentials (a ``head_bucket``)."""
    remote = default_remote(repo)
    client = s3_client(repo)
    with _s3_errors(client, remote.bucket):
        client.head_bucket(Bucket=remote.bucket)


# --- loopback S3 (moto server) -----------------------------------------------------------------


def _state_path(repo: Path) -> Path:
    return Path(repo) / ".dvc" / "tmp" / STATE_FILE


def _answers(port: int) -> bool:
    """Whether an HTTP server answers on 127.0.0.1:port."""
    conn = http.client.HTTPConnection(HOST, port, timeout=1)
    try:
        conn.request("HEAD", "/")
        conn.getresponse()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def _is_moto(pid: int) -> bool:
    """Whether ``pid`` is a live moto server process (not a zombie, not a recycled pid)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    return b"moto" in cmdline.read_bytes() if cmdline.exists() else True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        with suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
        if not _is_moto(pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _terminate(pid: int) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers."""
    for sig, timeout in ((signal.SIGTERM, _STOP_TIMEOUT_S), (signal.SIGKILL, _STOP_TIMEOUT_S)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        if _wait_gone(pid, timeout):
            return
    raise CacheloraError(f"moto server (pid {pid}) did not stop")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _check_port_free(port: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            raise CacheloraError(f"port {port} on {HOST} is in use (choose another --port)") from None
    return port


def _running(repo: Path) -> LocalS3 | None:
    """The server recorded in the repo's state file, if it is still up."""
    state = _state_path(repo)
    if not state.is_file():
        return None
    data = read_json(state)
    if not (_is_moto(data["pid"]) and _answers(data["port"])):
        return None
    return LocalS3(**data)


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not _answers(port):
        if proc.poll() is not None:
            lines = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            last = lines[-1] if lines else "no output"
            raise CacheloraError(f"moto server exited with status {proc.returncode} ({last}); see {log}")
        if time.monotonic() > deadline:
            raise CacheloraError(
                f"moto server did not answer on {HOST}:{port} within {_START_TIMEOUT_S:.0f} s; see {log}"
            )
        time.sleep(0.1)


def _create_bucket(endpoint: str, bucket: str, region: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=DUMMY_KEY,
        aws_secret_access_key=DUMMY_SECRET,
    )
    extra = {} if region == DEFAULT_REGION else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    with _s3_errors(client, bucket):
        client.create_bucket(Bucket=bucket, **extra)


def _local_settings(endpoint: str) -> dict[str, str]:
    return {"endpointurl": endpoint, "access_key_id": DUMMY_KEY, "secret_access_key": DUMMY_SECRET}


def _edit_local_remote(repo: Path, remote: str, set_: dict[str, str], unset: dict[str, str]) -> None:
    """Set options of ``remote`` in .dvc/config.local; drop the ``unset`` ones still holding those values."""
    with _dvc_config(repo).edit("local") as conf:
        section = conf["remote"].setdefault(remote, {})
        section.update(set_)
        for key, value in unset.items():
            if section.get(key) == value:
                del section[key]
        if not section:
            del conf["remote"][remote]


def start_local_s3(repo: Path, port: int | None = None, bucket: str | None = None) -> LocalS3:
    """Start moto's S3 server on 127.0.0.1 as a detached process, create ``bucket`` (default: the
    bucket of the repo's default remote) and point that remote at it in .dvc/config.local.

    Starting while one is already running for this repo returns that one (``already_running``).
    """
    repo = Path(repo).resolve()
    remote = default_remote(repo)
    running = _running(repo)
    if running is not None:
        return replace(running, already_running=True)
    if importlib.util.find_spec("moto") is None:
        raise CacheloraError("moto is not installed (pip install 'moto[server]')")
    port = _free_port() if port is None else _check_port_free(port)
    endpoint = f"http://{HOST}:{port}"
    state = _state_path(repo)
    state.parent.mkdir(parents=True, exist_ok=True)
    log = state.with_name(LOG_FILE)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = LocalS3(endpoint=endpoint, port=port, pid=proc.pid, bucket=bucket or remote.bucket, remote=remote.name)
    try:
        _wait_ready(proc, port, log)
        _create_bucket(endpoint, server.bucket, remote.options.get("region") or DEFAULT_REGION)
        _edit_local_remote(repo, remote.name, _local_settings(endpoint), {})
        write_json(state, {k: v for k, v in vars(server).items() if k != "already_running"})
    except BaseException:
        _terminate(proc.pid)
        state.unlink(missing_ok=True)
        raise
    return server


def stop_local_s3(repo: Path) -> LocalS3 | None:
    """Stop the repo's loopback S3 (if any), remove its state file and the endpoint and credentials
    it wrote to .dvc/config.local; return what was stopped, or None when nothing was recorded."""
    state = _state_path(Path(repo))
    if not state.is_file():
        return None
    server = LocalS3(**read_json(state))
    if _is_moto(server.pid):
        _terminate(server.pid)
    _edit_local_remote(repo, server.remote, {}, _local_settings(server.endpoint))
    state.unlink()
    return server


def _repo_root() -> Path:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Path(Repo.find_root())
    except NotDvcRepoError:
        raise CacheloraError(f"{Path.cwd()}: not inside a DVC repository") from None


@click.group()
def s3() -> None:
    """S3 storage helpers."""


@s3.command("local")
@click.option("--port", type=int, default=None, help="Port on 127.0.0.1 (default: a free one).")
@click.option("--stop", is_flag=True, help="Stop the running server and undo its .dvc/config.local settings.")
@user_errors
def s3_local(port: int | None, stop: bool) -> None:
    """Run a loopback S3 (moto, in memory) and point the default DVC remote at it (.dvc/config.local)."""
    repo = _repo_root()
    if stop:
        stopped = stop_local_s3(repo)
        if stopped is None:
            click.echo("no local S3 recorded for this repository")
        else:
            click.echo(f"stopped local S3 at {stopped.endpoint} (pid {stopped.pid})")
            click.echo(f".dvc/config.local: removed endpointurl and credentials of remote '{stopped.remote}'")
        return
    server = start_local_s3(repo, port=port)
    if server.already_running:
        click.echo(f"local S3 already running at {server.endpoint} (pid {server.pid}), bucket '{server.bucket}'")
        return
    click.echo(f"local S3 at {server.endpoint} (pid {server.pid}), bucket '{server.bucket}' created")
    click.echo(
        f".dvc/config.local: remote '{server.remote}' endpointurl = {server.endpoint},"
        f" access_key_id and secret_access_key = dummy '{DUMMY_KEY}'"
    )
    click.echo("data lives in memory until `cachelora s3 local --stop`")


# --- release bundles ---------------------------------------------------------------------------


def _release_url(url: str) -> tuple[str, str]:
    bucket, prefix = split_s3_url(url)
    if not prefix:
        raise CacheloraError(f"{url}: a release needs a prefix (s3://BUCKET/PREFIX)")
    return bucket, prefix


def _folder_files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` except manifest.json, by relative POSIX path."""
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    files.pop(MANIFEST, None)
    return dict(sorted(files.items()))


def write_manifest(folder: Path) -> dict[str, Any]:
    """Write ``folder/manifest.json`` listing every file (path, sha256, size), sorted; return it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CacheloraError(f"{folder}: not a directory")
    files = _folder_files(folder)
    if not files:
        raise CacheloraError(f"{folder}: no files to list")
    manifest = {
        "files": [{"path": rel, "sha256": file_sha256(p), "size": p.stat().st_size} for rel, p in files.items()]
    }
    write_json(folder / MANIFEST, manifest)
    return manifest


def _manifest_entries(manifest: Any, source: str) -> list[dict[str, Any]]:
    """The manifest's file entries, checked: safe relative paths, unique, sha256 hex, sizes."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not files:
        raise CacheloraError(f"{source}: expected an object with a non-empty 'files' list")
    seen: set[str] = set()
    for i, entry in enumerate(files):
        path = entry.get("path") if isinstance(entry, dict) else None
        parts = PurePosixPath(path).parts if isinstance(path, str) else ()
        if (
            not parts
            or PurePosixPath(path).is_absolute()
            or ".." in parts
            or "\\" in path
            or path != PurePosixPath(path).as_posix()
            or path == MANIFEST
        ):
            raise CacheloraError(f"{source}: files[{i}]: bad path {path!r}")
        if path in seen:
            raise CacheloraError(f"{source}: files[{i}]: duplicate path {path!r}")
        seen.add(path)
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise CacheloraError(f"{source}: files[{i}] ({path}): bad sha256")
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CacheloraError(f"{source}: files[{i}] ({path}): bad size")
    return files


def _verify_file(path: Path, entry: dict[str, Any], label: str) -> None:
    """``path`` must have the entry's size and sha256; a mismatch names the file, expected and actual."""
    size = path.stat().st_size
    if size != entry["size"]:
        raise CacheloraError(f"{label}: size mismatch: expected {entry['size']} bytes, got {size}")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise CacheloraError(f"{label}: sha256 mismatch: expected {entry['sha256']}, got {digest}")


def publish_release(folder: Path, url: str, repo: Path | None = None) -> list[str]:
    """Upload ``folder`` (with its manifest.json, every file verified first) to the new prefix ``url``.

    Refuses when anything exists under the prefix: releases are never overwritten. manifest.json
    goes last. Returns the uploaded relative paths in upload order. ``repo``: see ``s3_client``.
    """
    folder = Path(folder)
    bucket, prefix = _release_url(url)
    entries = _manifest_entries(read_json(folder / MANIFEST), str(folder / MANIFEST))
    listed = {e["path"] for e in entries}
    unlisted = [rel for rel in _folder_files(folder) if rel not in listed]
    if unlisted:
        raise CacheloraError(f"{folder / unlisted[0]}: not listed in manifest.json (rewrite the manifest)")
    for entry in entries:
        path = folder / entry["path"]
        if not path.is_file():
            raise CacheloraError(f"{path}: listed in manifest.json but missing")
        _verify_file(path, entry, str(path))
    client = s3_client(repo)
    with _s3_errors(client, bucket):
        existing = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", MaxKeys=1)
    if existing.get("KeyCount", 0):
        raise CacheloraError(f"{url}: a release already exists there; releases are never overwritten")
    uploaded: list[str] = []
    try:
        with _s3_errors(client, bucket):
            for rel in [*(e["path"] for e in entries), MANIFEST]:
                client.upload_file(str(folder / rel), bucket, f"{prefix}/{rel}")
                uploaded.append(rel)
    except CacheloraError as exc:
        if uploaded:
            raise CacheloraError(f"{exc} (partial upload without manifest.json left at {url}; delete it)") from None
        raise
    return uploaded


def fetch_release(url: str, dest: Path, repo: Path | None = None) -> list[str]:
    """Download the release at ``url`` into the new directory ``dest``, re-checking every sha256 and
    size before renaming it into place (a failed fetch leaves no ``dest``). Returns the listed paths;
    ``dest`` also gets manifest.json. ``repo``: see ``s3_client``."""
    from botocore.exceptions import ClientError

    bucket, prefix = _release_url(url)
    dest = Path(dest)
    if dest.exists():
        raise CacheloraError(f"{dest}: already exists (fetch never overwrites)")
    client = s3_client(repo)
    with _s3_errors(client, bucket):
        try:
            body = client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in ("NoSuchKey", "404"):
                raise CacheloraError(f"no release at {url}: manifest.json missing") from None
            raise
    try:
        manifest = json.loads(body)
    except ValueError:
        raise CacheloraError(f"{url}/{MANIFEST}: malformed JSON") from None
    entries = _manifest_entries(manifest, f"{url}/{MANIFEST}")
    with atomic_dir(dest) as tmp, _s3_errors(client, bucket):
        (tmp / MANIFEST).write_bytes(body)
        for entry in entries:
            target = tmp / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            label = f"{url}/{entry['path']}"
            try:
                client.download_file(bucket, f"{prefix}/{entry['path']}", str(target))
            except ClientError as exc:
                if _error_code(exc) in ("NoSuchKey", "404"):
                    raise CacheloraError(f"{label}: listed in manifest.json but missing") from None
                raise
            _verify_file(target, entry, label)
    return [e["path"] for e in entries]


def _cli_repo(repo: Path | None) -> Path | None:
    """``--repo``, else the current directory when it is a DVC repo with a default S3 remote, else None."""
    if repo is not None:
        return repo
    try:
        default_remote(Path.cwd())
    except CacheloraError:
        return None
    return Path.cwd()


_REPO_OPTION = click.option(
    "--repo",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Use this DVC repo's default remote endpoint/credentials (default: the current directory when it"
    " has a default S3 remote, else AWS_* env).",
)


@click.command("fetch")
@click.option("--from", "url", required=True, help="Release prefix, s3://BUCKET/PREFIX.")
@click.option("--to", "dest", required=True, type=click.Path(path_type=Path), help="New directory to create.")
@_REPO_OPTION
@user_errors
def fetch_cmd(url: str, dest: Path, repo: Path | None) -> None:
    """Download a release, verifying every file's sha256 and size before it appears in --to."""
    files = fetch_release(url, dest, repo=_cli_repo(repo))
    click.echo(f"fetched {len(files)} files from {url} into {dest} (sha256 verified)")
