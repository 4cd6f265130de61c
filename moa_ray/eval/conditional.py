"""One small object written only on a condition: created if absent, replaced or deleted if unchanged.

The writer lease (:mod:`moa_ray.eval.lease`) needs these three atomic steps from the filesystem that holds the
output: write then read back is not enough, as two writers that race both read back their own file. Each store
offers them natively: a local disk by ``link`` (fails on an existing name) and a lock around compare-and-rename;
S3 by conditional requests (``PutObject`` with ``If-None-Match: *`` to create, ``If-Match: <etag>`` to replace
and delete); GCS by generation preconditions (``ifGenerationMatch=0`` to create, ``=<generation>`` after).
pyarrow's filesystems expose none of them, so the object stores are spoken to through their own APIs.
Any other filesystem is refused (:func:`conditional_object`).

A *version* is an opaque token of one written content (a hash, an ETag, a generation); every conditional step
names the version it expects, and fails (``None``/``False``) when the object changed or vanished.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import uuid
from collections.abc import Iterator
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlsplit

import pyarrow.fs as pafs

from moa_ray.eval.store import StoreError


class ConditionalObject(Protocol):
    """The atomic steps of one object; ``version`` tokens come from :meth:`read`, :meth:`create` or :meth:`replace`."""

    where: str

    def read(self) -> tuple[bytes, str] | None:
        """Its content and version, or None when absent."""
        ...

    def create(self, data: bytes) -> str | None:
        """Write ``data`` if no object exists; its version, or None when one does."""
        ...

    def replace(self, data: bytes, version: str) -> str | None:
        """Overwrite the object if it is still at ``version``; the new version, or None when it changed or vanished."""
        ...

    def delete(self, version: str) -> bool:
        """Remove the object if it is still at ``version``."""
        ...


class LocalObject:
    """A file on a local (POSIX) disk, always whole to a reader: created by ``link`` from a complete temporary file
    (which fails on an existing name), replaced by ``rename`` of one; replaced and deleted only under an exclusive
    lock (:meth:`_locked`), so the comparison and the write are one step."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.where = path

    @staticmethod
    def _version(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def _content(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _staged(self, data: bytes) -> str:
        """A complete temporary file beside the object, holding ``data``."""
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    @contextlib.contextmanager
    def _locked(self) -> Iterator[bytes | None]:
        """The content, with every other replace and delete locked out: an ``flock`` of a file beside it (which
        stays; NFS clients lock it too, as an open-for-writing file, where a directory could not be locked)."""
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._content()
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> tuple[bytes, str] | None:
        data = self._content()
        return None if data is None else (data, self._version(data))

    def create(self, data: bytes) -> str | None:
        tmp = self._staged(data)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return self._version(data)

    def replace(self, data: bytes, version: str) -> str | None:
        with self._locked() as current:
            if current is None or self._version(current) != version:
                return None
            os.replace(self._staged(data), self.path)
            return self._version(data)

    def delete(self, version: str) -> bool:
        with self._locked() as current:
            if current is None or self._version(current) != version:
                return False
            os.unlink(self.path)
            return True


def _bucket_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    if not bucket or not key:
        raise StoreError(f"{path}: not an object path (bucket/key)")
    return bucket, key


def _query(uri: str) -> dict[str, str]:
    return {name: values[-1] for name, values in parse_qs(urlsplit(uri).query).items()}


#: S3's answers when a condition does not hold: the object is absent, exists (412), changed (412, or 409 for a
#: conflicting write in flight).
_ABSENT = {"NoSuchKey", "404"}
_UNMET = {*_ABSENT, "PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _endpoint(override: str, scheme: str) -> str:
    return override if "://" in override else f"{scheme}://{override}"


class S3Object:
    """An S3 object through boto3's conditional requests. Credentials and region come from boto3's usual chain;
    the endpoint from the URI's ``endpoint_override`` (and ``scheme``), as pyarrow takes it, else from
    ``AWS_ENDPOINT_URL`` (boto3 reads it itself), else AWS."""

    def __init__(self, uri: str, path: str, region: str | None) -> None:
        try:
            import boto3
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise StoreError(f"{uri}: the writer lease on S3 needs boto3 for its conditional writes: pip install 'moa-ray[s3]'") from None
        self._client_error, self._boto_error = ClientError, BotoCoreError
        self.bucket, self.key = _bucket_key(path)
        self.where = f"s3://{self.bucket}/{self.key}"
        query = _query(uri)
        options: dict[str, Any] = {}
        if query.get("endpoint_override"):
            options["endpoint_url"] = _endpoint(query["endpoint_override"], query.get("scheme", "https"))
        region = query.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or region
        if region:
            options["region_name"] = region
        self.client = boto3.session.Session().client("s3", **options)

    @staticmethod
    def _code(err: Any) -> str:
        response = getattr(err, "response", {}) or {}
        return str(response.get("Error", {}).get("Code", "")) or str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))

    def _call(self, action: str, method: str, unmet: set[str], **params: Any) -> dict[str, Any] | None:
        """The request's answer, or None when S3 answered with one of the ``unmet`` error codes; others raise."""
        try:
            answer: dict[str, Any] = getattr(self.client, method)(Bucket=self.bucket, Key=self.key, **params)
        except self._client_error as err:
            if self._code(err) in unmet:
                return None
            raise StoreError(f"{self.where}: could not {action} the writer lease: {err}") from None
        except self._boto_error as err:  # no connection, no credentials: not an OSError
            raise StoreError(f"{self.where}: could not {action} the writer lease: {err}") from None
        return answer

    def read(self) -> tuple[bytes, str] | None:
        got = self._call("read", "get_object", _ABSENT)
        return None if got is None else (got["Body"].read(), str(got["ETag"]))

    def create(self, data: bytes) -> str | None:
        put = self._call("create", "put_object", _UNMET, Body=data, IfNoneMatch="*")
        return None if put is None else str(put["ETag"])

    def replace(self, data: bytes, version: str) -> str | None:
        put = self._call("update", "put_object", _UNMET, Body=data, IfMatch=version)
        return None if put is None else str(put["ETag"])

    def delete(self, version: str) -> bool:
        return self._call("remove", "delete_object", _UNMET, IfMatch=version) is not None


GCS_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"


class GCSObject:
    """A GCS object through the JSON API with generation preconditions. The endpoint is the URI's
    ``endpoint_override`` (and ``scheme``), else ``STORAGE_EMULATOR_HOST`` (anonymous, as Google's clients do),
    else Google's; credentials are google-auth's application default."""

    def __init__(self, uri: str, path: str) -> None:
        import httpx

        self.bucket, self.key = _bucket_key(path)
        self.where = f"gs://{self.bucket}/{self.key}"
        query = _query(uri)
        emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
        if query.get("endpoint_override"):
            self.endpoint, anonymous = _endpoint(query["endpoint_override"], query.get("scheme", "https")), True
        elif emulator:
            self.endpoint, anonymous = _endpoint(emulator, "http"), True
        else:
            self.endpoint, anonymous = "https://storage.googleapis.com", False
        self.endpoint = self.endpoint.rstrip("/")
        self._credentials: Any = None
        if not anonymous:
            try:
                import google.auth
            except ImportError:
                raise StoreError(f"{uri}: the writer lease on GCS needs google-auth for its requests: pip install 'moa-ray[gcs]'") from None
            self._credentials, _ = google.auth.default(scopes=[GCS_SCOPE])
        self.http, self._http_error = httpx.Client(timeout=30), httpx.HTTPError
        self._object_url = f"{self.endpoint}/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(self.key, safe='')}"

    def _headers(self) -> dict[str, str]:
        if self._credentials is None:
            return {}
        if not self._credentials.valid:
            import google.auth.transport.requests

            self._credentials.refresh(google.auth.transport.requests.Request())
        return {"Authorization": f"Bearer {self._credentials.token}"}

    def _send(self, action: str, method: str, url: str, **options: Any) -> Any:
        try:
            return self.http.request(method, url, headers=self._headers(), **options)
        except self._http_error as err:  # no connection: not an OSError
            raise StoreError(f"{self.where}: could not {action} the writer lease: {err}") from None

    def _check(self, response: Any, action: str, failed: set[int]) -> bool:
        """True on success, False on a precondition that did not hold; other answers raise."""
        if response.status_code in failed:
            return False
        if response.status_code >= 300:
            raise StoreError(f"{self.where}: could not {action} the writer lease: HTTP {response.status_code} {response.text[:200]}")
        return True

    def read(self) -> tuple[bytes, str] | None:
        response = self._send("read", "GET", self._object_url, params={"alt": "media"})
        if not self._check(response, "read", {404}):
            return None
        return response.content, response.headers["x-goog-generation"]

    def _upload(self, data: bytes, generation: str, action: str) -> str | None:
        response = self._send(
            action,
            "POST",
            f"{self.endpoint}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o",
            params={"uploadType": "media", "name": self.key, "ifGenerationMatch": generation},
            content=data,
        )
        if not self._check(response, action, {404, 412}):
            return None
        return str(response.json()["generation"])

    def create(self, data: bytes) -> str | None:
        return self._upload(data, "0", "create")  # generation 0: the object must not exist

    def replace(self, data: bytes, version: str) -> str | None:
        return self._upload(data, version, "update")

    def delete(self, version: str) -> bool:
        response = self._send("remove", "DELETE", self._object_url, params={"ifGenerationMatch": version})
        return self._check(response, "remove", {404, 412})


def conditional_object(uri: str, fs: pafs.FileSystem, path: str) -> ConditionalObject:
    """The object at ``path`` of ``fs`` (opened from ``uri``), with its store's atomic steps; a filesystem without
    them is refused, as two writers could then both believe they hold what it stores."""
    if isinstance(fs, pafs.LocalFileSystem):
        return LocalObject(path)
    if isinstance(fs, pafs.S3FileSystem):
        return S3Object(uri, path, fs.region)
    if fs.type_name == "gcs":
        return GCSObject(uri, path)
    raise StoreError(
        f"{uri}: the {fs.type_name} filesystem has no atomic create, so it cannot hold the writer lease that keeps two "
        "runs from writing one output; write to a local disk, S3 (s3://) or GCS (gs://)"
    )
