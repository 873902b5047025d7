"""S3 access, shared by models (``inferq.workers.models``) and batch jobs (``inferq.jobs``).

Everything goes through boto3's own configuration: its credential chain (unsigned requests
when it finds none, so public buckets such as Cortex's examples work) and
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for S3-compatible stores, so nothing
inferq-specific is needed for MinIO or a local S3 server.
"""

from __future__ import annotations

from typing import Any

import boto3
import botocore
import botocore.exceptions
from botocore.config import Config


def s3_client(attempts: int = 1) -> Any:
    """An S3 client from boto3's configuration; unsigned when no credentials are found.

    ``attempts``: boto3's own tries per call (model downloads retry with tenacity instead,
    so there boto3's retries would only multiply the attempts)."""
    session = boto3.session.Session()
    config = Config(retries={"total_max_attempts": attempts, "mode": "standard"},
                    connect_timeout=5, read_timeout=30)
    if session.get_credentials() is None:
        config = config.merge(Config(signature_version=botocore.UNSIGNED))
    return session.client("s3", config=config)


def s3_problem(exc: botocore.exceptions.ClientError, bucket: str, *, denied: str,
               missing: str = "key") -> str:
    """What an S3 error means, for a message: the bucket or key is missing, access is denied
    (``denied`` says what to check), or S3's own code and message. ``missing``: what a bare
    404 means (a HEAD answer has no body to say)."""
    code = error_code(exc)
    if code == "NoSuchBucket" or (code in ("404", "NotFound") and missing == "bucket"):
        return f'bucket "{bucket}" does not exist'
    if code in ("NoSuchKey", "404", "NotFound"):
        return "no such key"
    if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId",
                "SignatureDoesNotMatch", "ExpiredToken"):
        return f"access denied ({denied})"
    message = exc.response.get("Error", {}).get("Message") or str(exc)
    return f"{code}: {message}"


def error_code(exc: botocore.exceptions.ClientError) -> str:
    """S3's error code (``NoSuchKey``, ``404`` ...)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
