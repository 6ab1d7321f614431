"""S3 storage: the repo's DVC remote, a boto3 client configured as DVC would be, and one-line S3 errors.

Releases (manifest, publish, fetch) live in ``cachelora.releases``; the loopback S3 for development
is moto's own server (``make s3-local``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachelora.errors import CacheloraError

_AUTH_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}


@dataclass(frozen=True)
class Remote:
    """A repo's default DVC remote: name, url, bucket and its (merged) options."""

    name: str
    url: str
    bucket: str
    options: dict[str, Any]


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


def error_code(exc: Any) -> str:
    """The S3 error code of a botocore ClientError (``NoSuchKey``, ``404``, ``PreconditionFailed``, ...)."""
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
def s3_errors(client: Any, bucket: str) -> Iterator[None]:
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
        hint = " — is `make s3-local` running?" if ("127.0.0.1" in endpoint or "localhost" in endpoint) else ""
        raise CacheloraError(f"cannot reach S3 endpoint {endpoint}: {_unreachable_reason(exc)}{hint}") from None
    except ClientError as exc:
        code = error_code(exc)
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
