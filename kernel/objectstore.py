"""One small interface over a local folder and an S3 prefix, for batch manifests and outputs.

`open_store("s3://bucket/prefix")` or `open_store("/some/folder")`. Keys are relative, '/'-separated
and checked (no '..', no absolute paths). A local write goes to a temporary name and is renamed, so a
reader never sees half a file; an S3 PUT is all-or-nothing by itself. S3 goes through boto3; the
endpoint comes from `endpoint_url` (settings' `s3_endpoint_url`) or boto3's own AWS_ENDPOINT_URL, so
SeaweedFS (the stack's) or moto's server serve as well as AWS.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Protocol

from atelier.kernel.errors import AtelierError, NotFound, ServiceUnavailable
from atelier.kernel.storage import write_bytes_atomic


class StoreError(AtelierError):
    pass


def check_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or any(p in ("..", ".") for p in parts) or "\\" in key:
        raise StoreError(repr(key), "is not a safe relative key", "use names made of letters, digits, '.', '_', '-' and '/'")
    return key


class Store(Protocol):
    url: str

    def exists(self, key: str) -> bool: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def list(self, prefix: str = "") -> list[str]: ...


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(str(path), "does not exist", "check the path")
        return path.read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        write_bytes_atomic(self._path(key), data)

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")
        )  # dot files: temporaries


class S3Store:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None, client=None) -> None:
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kw)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"s3://{self.bucket}/{kw.get('Key', '')}", "does not exist", "check the bucket and key") from None
            if code == "NoSuchBucket":
                raise NotFound(f"s3://{self.bucket}", "bucket does not exist", "create it or fix the URL") from None
            raise StoreError(
                f"s3://{self.bucket}/{kw.get('Key', kw.get('Prefix', ''))}",
                f"{what} failed ({code}: {exc})",
                "check the credentials and the endpoint (s3_endpoint_url)",
            ) from None
        except BotoCoreError as exc:
            endpoint = self.client.meta.endpoint_url
            raise ServiceUnavailable(
                f"S3 at {endpoint}",
                f"did not answer ({what} {self.url}: {exc})",
                "start it again (`atelier up` restarts the stack's) and rerun; nothing was half-written",
            ) from None

    def ensure_bucket(self) -> bool:
        """Create the bucket when missing; True when created."""
        try:
            self._call("HEAD bucket", self.client.head_bucket)
            return False
        except NotFound:
            self._call("CREATE bucket", self.client.create_bucket)
            return True

    def exists(self, key: str) -> bool:
        try:
            self._call("HEAD", self.client.head_object, Key=self._key(key))
            return True
        except NotFound:
            return False

    def read_bytes(self, key: str) -> bytes:
        return self._call("GET", self.client.get_object, Key=self._key(key))["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("PUT", self.client.put_object, Key=self._key(key), Body=data)

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        keys, token = [], None
        while True:
            kw = {"Prefix": full, **({"ContinuationToken": token} if token else {})}
            page = self._call("LIST", self.client.list_objects_v2, **kw)
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in keys)


def open_store(url: str, endpoint_url: str | None = None) -> Store:
    """A folder path or s3://bucket[/prefix]."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        if not bucket:
            raise StoreError(url, "names no bucket", "write s3://BUCKET/PREFIX")
        return S3Store(bucket, prefix, endpoint_url)
    if "://" in url:
        raise StoreError(url, "is neither a local path nor s3://", "use a folder path or s3://BUCKET/PREFIX")
    return LocalStore(Path(url))


def split_file_url(url: str) -> tuple[str, str]:
    """'s3://b/p/manifest.jsonl' -> ('s3://b/p', 'manifest.jsonl'); a local file path likewise."""
    if url.startswith("s3://"):
        head, _, name = url.rstrip("/").rpartition("/")
        if head == "s3:/" or not name:
            raise StoreError(url, "names no object", "write s3://BUCKET/KEY")
        return head, name
    path = Path(url).expanduser().resolve()
    return str(path.parent), path.name
