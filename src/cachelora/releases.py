"""Release bundles for consumers without DVC: build, publish, fetch.

A release is a plain S3 prefix holding files plus a ``manifest.json`` (path, sha256, size of each).
It is identified by the sha256 of the manifest's bytes, which ``publish`` prints and records in the
repo's committed ``releases.json``; ``fetch`` requires that digest, so nothing in the bucket has to
be trusted: the manifest must hash to the digest, and every file to its manifest entry.

Publishing never overwrites and never checks-then-writes: every object, data first and
``manifest.json`` last, is a conditional put (``If-None-Match: *``) that the endpoint refuses (412)
when the key exists. A release with no manifest is incomplete and cannot be fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from cachelora.errors import CacheloraError
from cachelora.records import file_sha256, new_temp_dir, read_json, write_json
from cachelora.storage import default_remote, error_code, s3_client, s3_errors, split_s3_url

MANIFEST = "manifest.json"
RELEASES_FILE = "releases.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_MANIFEST_BYTES = 64 << 20
_CHUNK = 1 << 20
_NOT_FOUND = ("NoSuchKey", "404")
_REFUSED = ("PreconditionFailed", "412", "ConditionalRequestConflict")


class ReleaseExists(CacheloraError):
    """The endpoint refused a conditional put: something already exists at that key."""


@dataclass(frozen=True)
class Release:
    """A published release: its canonical URL, manifest digest, file count and total bytes."""

    url: str
    manifest_sha256: str
    files: int
    bytes: int
    published_at: str


# --- URLs, digests, releases.json --------------------------------------------------------------


def release_url(url: str) -> tuple[str, str, str]:
    """``url`` as (canonical ``s3://bucket/prefix``, bucket, prefix); a release needs a prefix."""
    bucket, prefix = split_s3_url(url)
    if not prefix:
        raise CacheloraError(f"{url}: a release needs a prefix (s3://BUCKET/PREFIX)")
    return f"s3://{bucket}/{prefix}", bucket, prefix


def check_digest(value: str, source: str) -> str:
    """A sha256 hex digest (case-insensitive), lower-cased; anything else is a one-line error."""
    digest = value.strip().lower()
    if not _SHA256.fullmatch(digest):
        raise CacheloraError(f"{source}: expected a sha256 (64 hex digits), got {value!r}")
    return digest


def enclosing_repo(start: Path | None = None) -> Path | None:
    """The nearest directory from ``start`` (default: the current one) upwards holding ``.dvc/``."""
    here = Path(start or Path.cwd()).resolve()
    return next((d for d in (here, *here.parents) if (d / ".dvc").is_dir()), None)


def _read_releases(path: Path) -> dict[str, Any]:
    records = read_json(path)
    if not isinstance(records, dict):
        raise CacheloraError(f"{path}: expected a JSON object (release URL -> record)")
    return records


def record_release(repo: Path, release: Release) -> Path:
    """Add (or replace) ``release``'s entry in ``repo/releases.json``, written atomically."""
    path = Path(repo) / RELEASES_FILE
    records = _read_releases(path) if path.is_file() else {}
    records[release.url] = {
        "manifest_sha256": release.manifest_sha256,
        "files": release.files,
        "bytes": release.bytes,
        "published_at": release.published_at,
    }
    write_json(path, records)
    return path


def recorded_digest(repo: Path, url: str) -> str | None:
    """The manifest sha256 ``repo/releases.json`` records for ``url``; None when it has no entry."""
    canonical = release_url(url)[0]
    path = Path(repo) / RELEASES_FILE
    if not path.is_file():
        return None
    entry = _read_releases(path).get(canonical)
    if entry is None:
        return None
    value = entry.get("manifest_sha256") if isinstance(entry, dict) else None
    if not isinstance(value, str):
        raise CacheloraError(f"{path}: {canonical}: no manifest_sha256")
    return check_digest(value, f"{path}: {canonical}: manifest_sha256")


def required_digest(url: str, sha256: str | None, repo: Path | None) -> str:
    """The digest a fetch of ``url`` must match: ``sha256`` when given, else ``repo``'s releases.json."""
    canonical = release_url(url)[0]
    if sha256 is not None:
        return check_digest(sha256, "--sha256")
    recorded = recorded_digest(repo, canonical) if repo is not None else None
    if recorded is None:
        where = f"{Path(repo) / RELEASES_FILE} has no entry for it" if repo is not None else "not inside the repo"
        raise CacheloraError(
            f"no sha256 for {canonical} ({where}): pass --sha256 with the digest `cachelora publish` printed"
        )
    return recorded


def client_repo(repo: Path | None) -> Path | None:
    """The repo whose default S3 remote gives endpoint and credentials: ``repo`` when given, else the
    enclosing DVC repo when its default remote is S3; None means boto3's defaults (AWS_* env)."""
    if repo is not None:
        return repo
    found = enclosing_repo()
    if found is None:
        return None
    try:
        default_remote(found)
    except CacheloraError:
        return None
    return found


# --- manifest ----------------------------------------------------------------------------------


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


def _parse_manifest(body: bytes, source: str) -> list[dict[str, Any]]:
    """The manifest's file entries, checked: safe relative paths, unique, sha256 hex, sizes."""
    try:
        manifest = json.loads(body)
    except ValueError:
        raise CacheloraError(f"{source}: malformed JSON") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not files:
        raise CacheloraError(f"{source}: expected an object with a non-empty 'files' list")
    seen: set[str] = set()
    folders: set[str] = set()
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
        folders.update(PurePosixPath(*parts[:n]).as_posix() for n in range(1, len(parts)))
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise CacheloraError(f"{source}: files[{i}] ({path}): bad sha256")
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CacheloraError(f"{source}: files[{i}] ({path}): bad size")
    for i, entry in enumerate(files):
        if entry["path"] in folders:
            raise CacheloraError(f"{source}: files[{i}]: {entry['path']!r} is also listed as a folder of other files")
    return files


def _verify_file(path: Path, entry: dict[str, Any], label: str) -> None:
    """``path`` must have the entry's size and sha256; a mismatch names the file, expected and actual."""
    size = path.stat().st_size
    if size != entry["size"]:
        raise CacheloraError(f"{label}: size mismatch: expected {entry['size']} bytes, got {size}")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise CacheloraError(f"{label}: sha256 mismatch: expected {entry['sha256']}, got {digest}")


def build_release(folder: Path, model_name: str | None, adapters: list[str]) -> dict[str, Any]:
    """A release for consumers without DVC: exported model, adapters, results, metrics, lock, manifest."""
    from cachelora import paths
    from cachelora.export import export_model
    from cachelora.report import LOCK, RESULTS

    export_model(model_name, folder / "model")
    for name in adapters:
        shutil.copytree(paths.model_dir(name), folder / "adapters" / name)
    shutil.copytree(paths.METRICS_DIR, folder / "metrics")
    for file in (RESULTS, LOCK):
        shutil.copy2(file, folder / file.name)
    return write_manifest(folder)


# --- publish -----------------------------------------------------------------------------------


def _put_new(client: Any, bucket: str, key: str, body: Any, url: str, uploaded: int) -> None:
    """Put ``key`` only if it does not exist (``If-None-Match: *``); the endpoint's 412 is a refusal."""
    from botocore.exceptions import ClientError

    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except ClientError as exc:
        if error_code(exc) not in _REFUSED:
            raise
        left = f" (this attempt left {uploaded} new objects there, no manifest.json of its own)" if uploaded else ""
        raise ReleaseExists(
            f"{url}: a release already exists there ({key} is taken); releases are never overwritten{left}"
        ) from None


def publish_release(folder: Path, url: str, repo: Path | None = None) -> Release:
    """Upload ``folder`` (its manifest.json and every file it lists, each verified first) to ``url``.

    Data objects go first, ``manifest.json`` last, each with a conditional put, so an existing
    release (or any object at those keys) is never overwritten and a half-published one has no
    manifest. Returns the release with its manifest digest. ``repo``: see ``s3_client``.
    """
    folder = Path(folder)
    canonical, bucket, prefix = release_url(url)
    manifest_path = folder / MANIFEST
    try:
        body = manifest_path.read_bytes()
    except FileNotFoundError:
        raise CacheloraError(f"{manifest_path}: file not found (write the manifest first)") from None
    entries = _parse_manifest(body, str(manifest_path))
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
    uploaded = 0
    try:
        with s3_errors(client, bucket):
            for entry in entries:
                with (folder / entry["path"]).open("rb") as fh:
                    _put_new(client, bucket, f"{prefix}/{entry['path']}", fh, canonical, uploaded)
                uploaded += 1
            _put_new(client, bucket, f"{prefix}/{MANIFEST}", body, canonical, uploaded)
    except ReleaseExists:
        raise
    except CacheloraError as exc:
        if uploaded:
            raise CacheloraError(
                f"{exc} (partial upload of {uploaded} objects without manifest.json left at {canonical};"
                " delete them before retrying)"
            ) from None
        raise
    return Release(
        url=canonical,
        manifest_sha256=hashlib.sha256(body).hexdigest(),
        files=len(entries),
        bytes=sum(e["size"] for e in entries),
        published_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


# --- fetch -------------------------------------------------------------------------------------


def _get(client: Any, bucket: str, key: str, missing: str) -> dict[str, Any]:
    from botocore.exceptions import ClientError

    try:
        return client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if error_code(exc) in _NOT_FOUND:
            raise CacheloraError(missing) from None
        raise


def _download(client: Any, bucket: str, key: str, target: Path, entry: dict[str, Any], label: str) -> None:
    """Stream ``key`` into ``target`` (never more than the entry's size), checking size and sha256."""
    response = _get(client, bucket, key, f"{label}: listed in manifest.json but missing")
    expected = entry["size"]
    if response["ContentLength"] != expected:
        response["Body"].close()
        raise CacheloraError(f"{label}: size mismatch: expected {expected} bytes, got {response['ContentLength']}")
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for chunk in response["Body"].iter_chunks(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != entry["sha256"]:
        raise CacheloraError(f"{label}: sha256 mismatch: expected {entry['sha256']}, got {digest.hexdigest()}")


def fetch_release(url: str, dest: Path, sha256: str, repo: Path | None = None) -> list[str]:
    """Download the release at ``url`` into the new directory ``dest``.

    ``manifest.json`` must hash to ``sha256`` before anything in it is used; every file then goes
    into a temp directory beside ``dest`` and must match its manifest entry (size and sha256). Only
    then is the temp directory renamed to ``dest``; a failed fetch leaves neither. Returns the
    listed paths (``dest`` also gets manifest.json). ``repo``: see ``s3_client``.
    """
    canonical, bucket, prefix = release_url(url)
    dest = Path(dest)
    if dest.exists():
        raise CacheloraError(f"{dest}: already exists (fetch never overwrites)")
    expected = check_digest(sha256, "sha256")
    client = s3_client(repo)
    source = f"{canonical}/{MANIFEST}"
    with s3_errors(client, bucket):
        response = _get(client, bucket, f"{prefix}/{MANIFEST}", f"no release at {canonical}: manifest.json missing")
        body = response["Body"].read(_MAX_MANIFEST_BYTES + 1)
    if len(body) > _MAX_MANIFEST_BYTES:
        raise CacheloraError(f"{source}: larger than {_MAX_MANIFEST_BYTES} bytes; not a release manifest")
    actual = hashlib.sha256(body).hexdigest()
    if actual != expected:
        raise CacheloraError(
            f"{source}: sha256 mismatch: expected {expected}, got {actual} (not the release that was published)"
        )
    entries = _parse_manifest(body, source)
    tmp = new_temp_dir(dest)  # a killed fetch's leftover is removed by the next fetch to dest
    try:
        with s3_errors(client, bucket):
            for entry in entries:
                target = tmp / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                _download(client, bucket, f"{prefix}/{entry['path']}", target, entry, f"{canonical}/{entry['path']}")
        (tmp / MANIFEST).write_bytes(body)
        if dest.exists():
            raise CacheloraError(f"{dest}: already exists (fetch never overwrites)")
        os.rename(tmp, dest)
    except OSError as exc:  # a full disk, a read-only folder: nothing is left behind
        raise CacheloraError(f"{dest}: fetch failed, nothing written ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [e["path"] for e in entries]
