"""The artifact store: datasets and model files, by key, on disk or in S3.

Keys are made by the workbench (``datasets/<tenant>/<dataset>/<sha256>``), never taken from
a user; ``_check_key`` still refuses anything that could escape the store's root.
``ARTIFACT_STORE`` picks the backend: ``file:///abs/path`` or ``s3://bucket/prefix``
(boto3; honours ``AWS_ENDPOINT_URL`` for MinIO or other S3-compatible servers).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlparse

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")
CHUNK = 1024 * 1024


def _check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid artifact key {key!r}")
    return key


class ArtifactStore(Protocol):
    url: str

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None: ...
    def open(self, key: str) -> IO[bytes]: ...
    def iter_bytes(self, key: str) -> Iterator[bytes]: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def ping(self) -> None: ...
    def uri(self, key: str) -> str: ...


class LocalArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = f"file://{self.root}"
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / _check_key(key)).resolve()
        if self.root not in path.parents:
            raise ValueError(f"invalid artifact key {key!r}")
        return path

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        if move:
            try:
                os.replace(path, partial)  # same filesystem: no copy at all
            except OSError:
                shutil.copyfile(path, partial)
        else:
            shutil.copyfile(path, partial)
        os.replace(partial, target)  # readers never see a half-written object

    def open(self, key: str) -> IO[bytes]:
        return self._path(key).open("rb")

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        with self.open(key) as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"artifact root {self.root} is not writable")

    def uri(self, key: str) -> str:
        """Where a process without Django (a fleet replica) reads the object."""
        return self._path(key).as_uri()


class S3ArtifactStore:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # botocore's defaults (60 s connect timeout, retried) would hang /readyz for
        # minutes on an S3 host that never answers.
        config = Config(
            connect_timeout=5, read_timeout=60, retries={"mode": "standard", "max_attempts": 3}
        )
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        # upload_file switches to parallel multipart uploads for big files.
        self.client.upload_file(str(path), self.bucket, self._key(key))
        if move:
            path.unlink(missing_ok=True)

    def open(self, key: str) -> IO[bytes]:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        body = self.open(key)
        try:
            yield from body.iter_chunks(CHUNK)  # type: ignore[attr-defined]
        finally:
            body.close()

    def size(self, key: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def uri(self, key: str) -> str:
        """Where a process without Django (a fleet replica) reads the object."""
        return f"s3://{self.bucket}/{self._key(key)}"


def store_from_url(url: str, endpoint_url: str | None = None) -> ArtifactStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(parsed.netloc + parsed.path) if parsed.netloc else Path(parsed.path)
        if not path.is_absolute():
            path = Path(settings.BASE_DIR) / path
        return LocalArtifactStore(path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ImproperlyConfigured(f"ARTIFACT_STORE={url!r} names no bucket")
        return S3ArtifactStore(parsed.netloc, parsed.path, endpoint_url)
    raise ImproperlyConfigured(f"ARTIFACT_STORE={url!r}: use file:///path or s3://bucket/prefix")


def download(key: str, target: Path) -> str:
    """Copy the object at ``key`` to the local file ``target``; returns its sha256."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        for chunk in get_store().iter_bytes(key):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=4)
def _cached(url: str, endpoint_url: str | None) -> ArtifactStore:
    return store_from_url(url, endpoint_url)


def get_store() -> ArtifactStore:
    return _cached(settings.ARTIFACT_STORE, settings.AWS_ENDPOINT_URL)
