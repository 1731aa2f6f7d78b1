"""Object storage behind one interface: a local directory (default) or an S3-compatible bucket.

Keys are relative POSIX paths such as ``jobs/{id}/0.png``; writing a key again overwrites it, which is
what makes a re-run of a job idempotent.
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from typing import Any

from ebca_common.errors import ObjectNotFound, StorageError
from ebca_common.settings import Settings


def check_key(key: str) -> str:
    """Reject keys that could escape the store (absolute paths, ``..``)."""
    path = PurePosixPath(key)
    if not key or path.is_absolute() or any(part in ("..", ".", "") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class Storage(ABC):
    """Where job inputs and results live."""

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes of ``key``; :class:`ObjectNotFound` if absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are fine."""

    @abstractmethod
    def presigned_url(self, key: str) -> str | None:
        """A time-limited download URL, or None when the api serves the bytes itself (local store)."""

    def local_path(self, key: str) -> Path | None:
        """The file behind ``key`` for stores on the local filesystem, else None."""
        return None


class LocalStorage(Storage):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a reader never sees half a file, and a re-run replaces it atomically.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write {key}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"no stored object {key!r}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {key}: {exc}") from exc

    def presigned_url(self, key: str) -> str | None:
        return None

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


class S3Storage(Storage):
    """An S3-compatible bucket (AWS, MinIO, moto) through boto3; downloads via presigned URLs."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        client: Any,
        presign_seconds: int = 3600,
        presign_client: Any | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        self.presign_seconds = presign_seconds
        # A presigned URL's signature covers its host, so URLs for clients outside the network the
        # service uses (compose's "minio:9000") must be signed by a client configured for that host.
        self.presign_client = presign_client if presign_client is not None else client

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        import boto3
        from botocore.config import Config

        rest = settings.storage_url.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"EBCA_STORAGE_URL {settings.storage_url!r} has no bucket")

        def make_client(endpoint_url: str | None) -> Any:
            return boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                aws_access_key_id=settings.aws_access_key_id,
                aws_secret_access_key=settings.aws_secret_access_key,
                aws_session_token=settings.aws_session_token,
                region_name=settings.aws_region,
                config=Config(
                    signature_version="s3v4",
                    s3={"addressing_style": "path"},
                    retries={"max_attempts": 2},
                    connect_timeout=5,
                    read_timeout=30,
                ),
            )

        client = make_client(settings.s3_endpoint_url)
        presign_client = make_client(settings.s3_public_url) if settings.s3_public_url else None
        return cls(bucket, prefix, client, settings.presign_seconds, presign_client)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot write {key} to s3://{self.bucket}: {exc}") from exc

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"no stored object {key!r}") from None
            raise StorageError(f"cannot read {key} from s3://{self.bucket}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot read {key} from s3://{self.bucket}: {exc}") from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise StorageError(f"cannot stat {key} in s3://{self.bucket}: {exc}") from exc

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot delete {key} from s3://{self.bucket}: {exc}") from exc

    def presigned_url(self, key: str) -> str | None:
        return self.presign_client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=self.presign_seconds,
        )


def storage_from_settings(settings: Settings) -> Storage:
    """The backend selected by EBCA_STORAGE_URL."""
    if settings.storage_is_s3:
        return S3Storage.from_settings(settings)
    return LocalStorage(settings.storage_root)
