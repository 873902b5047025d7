"""Fetching an API's ``model``: a project-relative path, or an S3 object or prefix.

``s3://bucket/key`` downloads one object; ``s3://bucket/prefix/`` (or a key that is no object
but has objects under it) downloads every object under the prefix into a folder. S3 access is
boto3's own configuration: its credential chain (unsigned requests when it finds none, so
public buckets such as Cortex's examples work) and ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` for S3-compatible stores.

Downloads are cached per host, keyed by URL and ETags::

    cache_dir/<sha256(url)[:16]>/
        .lock           flock held while downloading, so replicas download once
        meta.json       the URL, the ETag of each object, the version in use
        <version>/<name>  the file or folder; <version> hashes the ETags, so it never changes

A version folder appears by an atomic rename once complete: a killed download leaves only a
``.tmp-*`` folder, which the next download removes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import botocore.exceptions
from boto3.exceptions import RetriesExceededError
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from inferq.errors import ModelDownloadError
from inferq.s3 import error_code, http_status, s3_client, s3_problem

log = logging.getLogger("inferq.models")

ATTEMPTS = 5  # per S3 call, for transient errors only; waits 0.5 + 1 + 2 + 4 s at most
_THROTTLED = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout",
              "RequestLimitExceeded", "TooManyRequestsException", "InternalError"}
_DENIED = ("check the AWS credentials: environment variables, AWS_PROFILE, ~/.aws, or the "
           "instance role; they need s3:GetObject, and s3:ListBucket for a prefix")

T = TypeVar("T")


def fetch_model(model: str, project: Path, cache_dir: Path, *, api: str) -> Path:
    """The local path of ``model``: a file or folder in ``project``, or downloaded from S3.

    Parameters
    ----------
    model:
        ``s3://bucket/key``, ``s3://bucket/prefix/`` or a path relative to ``project``.
    project:
        The API's project folder.
    cache_dir:
        This host's model cache, shared by its replicas.
    api:
        The API's name, for error messages.

    Returns the file (an S3 object keeps its base name) or folder. Raises
    :class:`ModelDownloadError` when the model is missing or cannot be downloaded.
    """
    if model.startswith("s3://"):
        return _S3Model(model, api).fetch(Path(cache_dir))
    if "://" in model:
        raise ModelDownloadError(f'api "{api}": model {model}: only s3:// URLs can be downloaded')
    path = (Path(project) / model).resolve()
    if not path.exists():
        raise ModelDownloadError(f'api "{api}": model {model}: {path} does not exist')
    return path


@dataclass(frozen=True)
class _Object:
    key: str
    relative: str  # path under the model's folder ("" for a single object)
    etag: str


class _S3Model:
    """One ``s3://`` model of one API: what it holds remotely, and its cached copy."""

    def __init__(self, url: str, api: str) -> None:
        self.url = url
        self.api = api
        self.bucket, _, self.key = url[len("s3://"):].partition("/")
        if not self.bucket:
            raise self._error("the URL names no bucket (expected s3://bucket/key)")
        self.client = s3_client()

    def fetch(self, cache_dir: Path) -> Path:
        """Download the model unless this host holds its current ETags; return its path."""
        objects, name = self._list()
        etags = {o.key: o.etag for o in objects}
        version = hashlib.sha256(json.dumps(etags, sort_keys=True).encode()).hexdigest()[:16]
        home = cache_dir / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        target = home / version / name
        if target.exists():  # version folders appear complete or not at all
            return target
        try:
            home.mkdir(parents=True, exist_ok=True)
            with open(home / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another replica may be downloading it now
                if not target.exists():
                    self._download(objects, home, version, name)
                    _write_json(home / "meta.json",
                                {"url": self.url, "etags": etags, "version": version,
                                 "path": f"{version}/{name}"})
                    _prune(home, keep=version)
        except OSError as exc:
            raise self._error(f"cannot write the model cache {home}: {exc}") from exc
        return target

    def _list(self) -> tuple[list[_Object], str]:
        """The objects the URL names, and the file or folder name to store them under."""
        denied = None
        is_prefix = not self.key or self.key.endswith("/")
        if not is_prefix:
            try:
                head = self._call(self.client.head_object, Bucket=self.bucket, Key=self.key)
                return [_Object(self.key, "", head["ETag"])], PurePosixPath(self.key).name
            except botocore.exceptions.ClientError as exc:
                if http_status(exc) not in (403, 404):
                    raise self._client_error(exc) from exc
                # a key may be a prefix; 403 is also S3's answer for a missing key to
                # someone who may not list the bucket, so the listing decides
                denied = exc if http_status(exc) == 403 else None
        prefix = self.key if is_prefix else self.key + "/"
        objects = self._list_prefix(prefix)
        if not objects and denied is not None:
            raise self._client_error(denied)
        if not objects:
            raise self._error("no objects under the prefix" if is_prefix else "no such key")
        return objects, PurePosixPath(prefix).name or self.bucket

    def _list_prefix(self, prefix: str) -> list[_Object]:
        objects = []
        token: dict[str, str] = {}
        while True:
            try:
                page = self._call(self.client.list_objects_v2, Bucket=self.bucket,
                                  Prefix=prefix, **token)
            except botocore.exceptions.ClientError as exc:
                raise self._client_error(exc) from exc
            for item in page.get("Contents", []):
                key = item["Key"]
                if key.endswith("/"):
                    continue  # a "folder" marker the S3 consoles create
                relative = PurePosixPath(key[len(prefix):])
                if ".." in relative.parts or relative.is_absolute():
                    raise self._error(f"refusing to download key {key!r} outside the folder")
                objects.append(_Object(key, str(relative), item["ETag"]))
            if not page.get("IsTruncated"):
                return objects
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def _download(self, objects: list[_Object], home: Path, version: str, name: str) -> None:
        log.info('api "%s": downloading %s (%d object%s)', self.api, self.url, len(objects),
                 "" if len(objects) == 1 else "s")
        temporary = Path(tempfile.mkdtemp(prefix=".tmp-", dir=home))
        try:
            for obj in objects:
                path = temporary / name / obj.relative if obj.relative else temporary / name
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self._call(self.client.download_file, self.bucket, obj.key, str(path))
                except botocore.exceptions.ClientError as exc:
                    raise self._client_error(exc, key=obj.key) from exc
            temporary.rename(home / version)  # the one step that makes the download visible
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(...)``, retried on transient errors; their last one as ModelDownloadError."""
        retrying = Retrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_attempt(ATTEMPTS) | stop_after_delay(25),
            wait=wait_exponential(multiplier=0.5, max=8),
            before_sleep=lambda state: log.warning(
                'api "%s": %s: %s; retrying (attempt %d of %d)', self.api, self.url,
                state.outcome and state.outcome.exception(), state.attempt_number + 1,
                ATTEMPTS),
            reraise=True,
        )
        try:
            return retrying(function, *args, **kwargs)
        except Exception as exc:
            if _transient(exc):
                raise self._error(f"S3 did not answer after {ATTEMPTS} attempts: {exc}") from exc
            raise

    def _client_error(self, exc: botocore.exceptions.ClientError, key: str | None = None):
        problem = s3_problem(exc, self.bucket, denied=_DENIED)
        if problem.startswith("bucket"):
            return self._error(problem)
        where = f"key {key}: " if key and key != self.key else ""
        return self._error(f"{where}{problem}")

    def _error(self, message: str) -> ModelDownloadError:
        return ModelDownloadError(f'api "{self.api}": model {self.url}: {message}')


def _transient(exc: BaseException) -> bool:
    """Worth another try: no connection, a timeout, throttling, or a 5xx."""
    if isinstance(exc, (botocore.exceptions.ConnectionError,
                        botocore.exceptions.HTTPClientError, RetriesExceededError)):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        return http_status(exc) >= 500 or http_status(exc) == 429 or error_code(exc) in _THROTTLED
    return False


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=2))
    temporary.replace(path)


def _prune(home: Path, *, keep: str) -> None:
    """Remove older versions and leftovers of killed downloads (the lock is held)."""
    for entry in home.iterdir():
        if entry.is_dir() and entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)
