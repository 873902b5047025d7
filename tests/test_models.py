"""A predictor's ``model``: a project file, an S3 object or an S3 prefix, cached per host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from inferq.errors import ModelDownloadError
from inferq.processes import spawn, stop, wait_until
from inferq.workers import models
from inferq.workers.models import fetch_model

ROOT = Path(__file__).resolve().parent.parent
FETCH = """
import logging, sys
from pathlib import Path
from inferq.workers.models import fetch_model
logging.basicConfig(level=logging.INFO)
print(fetch_model(sys.argv[1], Path("."), Path(sys.argv[2]), api="iris"))
"""


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache" / "models"


@pytest.fixture
def bucket(s3) -> str:
    s3.create_bucket(Bucket="models")
    return "models"


def fetch(url: str, cache: Path) -> Path:
    return fetch_model(url, Path("/nonexistent-project"), cache, api="iris")


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def start_fetch(url: str, cache: Path) -> subprocess.Popen:
    return spawn(
        [sys.executable, "-c", FETCH, url, str(cache)],
        cwd=str(ROOT), env=dict(os.environ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def test_single_object_is_downloaded_with_its_name_and_bytes(s3, bucket, cache):
    data = os.urandom(300_000)
    s3.put_object(Bucket=bucket, Key="iris/model.pkl", Body=data)

    path = fetch("s3://models/iris/model.pkl", cache)

    assert path.name == "model.pkl"  # predictors that look at the extension still work
    assert path.is_relative_to(cache)
    assert path.read_bytes() == data


@pytest.mark.parametrize("url", ["s3://models/sklearn/mpg/linreg", "s3://models/sklearn/mpg/linreg/"])
def test_prefix_is_downloaded_into_a_folder_with_its_sub_folders(s3, bucket, cache, url):
    s3.put_object(Bucket=bucket, Key="sklearn/mpg/linreg/", Body=b"")  # console folder markers
    s3.put_object(Bucket=bucket, Key="sklearn/mpg/linreg/empty/", Body=b"")
    s3.put_object(Bucket=bucket, Key="sklearn/mpg/linreg/model.pkl", Body=b"weights")
    s3.put_object(Bucket=bucket, Key="sklearn/mpg/linreg/meta/columns.json", Body=b"[1, 2]")
    s3.put_object(Bucket=bucket, Key="sklearn/mpg/linreg-old/model.pkl", Body=b"not this one")

    path = fetch(url, cache)

    assert path.is_dir() and path.name == "linreg"
    assert files_under(path) == {"model.pkl": b"weights", "meta/columns.json": b"[1, 2]"}


@pytest.mark.parametrize("url,key", [
    ("s3://models/iris.onnx", "iris.onnx"),
    ("s3://models/estimator/", "estimator/part-0"),
])
def test_second_fetch_of_an_unchanged_model_downloads_nothing(s3_proxy, s3, bucket, cache,
                                                              url, key):
    s3.put_object(Bucket=bucket, Key=key, Body=b"model bytes")
    first = fetch(url, cache)
    assert s3_proxy.object_gets(key) == 1
    inode = first.stat().st_ino

    second = fetch(url, cache)

    assert second == first and second.stat().st_ino == inode
    assert s3_proxy.object_gets(key) == 1  # only a HEAD or a listing compared the ETags


def test_changed_object_is_downloaded_again_and_the_old_copy_removed(s3, bucket, cache):
    s3.put_object(Bucket=bucket, Key="model.bin", Body=b"version 1")
    old = fetch("s3://models/model.bin", cache)
    s3.put_object(Bucket=bucket, Key="model.bin", Body=b"version 2")

    new = fetch("s3://models/model.bin", cache)

    assert new.read_bytes() == b"version 2"
    assert new != old and not old.exists()


def test_changed_file_under_a_prefix_is_downloaded_again(s3, bucket, cache):
    s3.put_object(Bucket=bucket, Key="m/a.txt", Body=b"a1")
    s3.put_object(Bucket=bucket, Key="m/b.txt", Body=b"b1")
    fetch("s3://models/m/", cache)
    s3.put_object(Bucket=bucket, Key="m/b.txt", Body=b"b2")

    assert files_under(fetch("s3://models/m/", cache)) == {"a.txt": b"a1", "b.txt": b"b2"}


def test_missing_key_is_reported_with_the_url_and_api(s3, bucket, cache):
    with pytest.raises(ModelDownloadError) as error:
        fetch("s3://models/nope.pkl", cache)
    assert str(error.value) == 'api "iris": model s3://models/nope.pkl: no such key'


def test_missing_bucket_is_reported(s3, cache):
    with pytest.raises(ModelDownloadError) as error:
        fetch("s3://no-such-bucket/model.pkl", cache)
    assert str(error.value) == (
        'api "iris": model s3://no-such-bucket/model.pkl: bucket "no-such-bucket" does not exist'
    )


def test_empty_prefix_is_reported(s3, bucket, cache):
    s3.put_object(Bucket=bucket, Key="other/model.pkl", Body=b"x")
    with pytest.raises(ModelDownloadError,
                       match=r"s3://models/empty/: no objects under the prefix"):
        fetch("s3://models/empty/", cache)


def test_access_denied_is_reported_at_once_without_retrying(s3_proxy, bucket, cache):
    s3_proxy.answer_next(5, 403, "AccessDenied")
    with pytest.raises(ModelDownloadError) as error:
        fetch("s3://models/model.pkl", cache)
    assert "s3://models/model.pkl: access denied (check the AWS credentials" in str(error.value)
    assert len(s3_proxy.requests) == 2  # the HEAD, then the listing that may tell a prefix


def test_transient_errors_are_retried(s3_proxy, s3, bucket, cache):
    s3.put_object(Bucket=bucket, Key="model.pkl", Body=b"weights")
    s3_proxy.answer_next(2, 503, "SlowDown")

    assert fetch("s3://models/model.pkl", cache).read_bytes() == b"weights"
    methods = [method for method, _, _ in s3_proxy.requests]
    assert methods[:3] == ["HEAD", "HEAD", "HEAD"]  # two answered 503, the third went through
    assert s3_proxy.object_gets("model.pkl") == 1


def test_persistent_server_errors_give_up_after_a_few_attempts(s3_proxy, bucket, cache,
                                                                monkeypatch):
    monkeypatch.setattr(models, "ATTEMPTS", 3)
    s3_proxy.answer_next(10, 500, "InternalError")
    with pytest.raises(ModelDownloadError, match=r"S3 did not answer after 3 attempts"):
        fetch("s3://models/model.pkl", cache)
    assert len(s3_proxy.requests) == 3


def test_public_bucket_works_without_credentials(s3_proxy, s3, bucket, cache, monkeypatch):
    s3.put_object(Bucket=bucket, Key="model.pkl", Body=b"public", ACL="public-read")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    assert fetch("s3://models/model.pkl", cache).read_bytes() == b"public"
    assert all("Authorization" not in headers for _, _, headers in s3_proxy.requests)


def test_s3_specific_endpoint_variable_is_honoured(s3_proxy, s3, bucket, cache, monkeypatch):
    s3.put_object(Bucket=bucket, Key="model.pkl", Body=b"weights")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_proxy.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there

    assert fetch("s3://models/model.pkl", cache).read_bytes() == b"weights"
    assert s3_proxy.object_gets("model.pkl") == 1


def test_project_relative_path_is_returned_resolved(tmp_path, cache):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pkl").write_bytes(b"x")

    path = fetch_model("models/model.pkl", tmp_path, cache, api="iris")

    assert path == (tmp_path / "models" / "model.pkl").resolve()
    assert not cache.exists()


def test_missing_project_path_is_reported(tmp_path, cache):
    with pytest.raises(ModelDownloadError, match=r'api "iris": model models/none.pkl: .* does not'):
        fetch_model("models/none.pkl", tmp_path, cache, api="iris")


def test_two_replicas_fetching_at_once_download_once_and_both_get_the_whole_file(
    s3_proxy, s3, bucket, cache
):
    data = os.urandom(2_000_000)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=data)
    s3_proxy.stall()
    first = start_fetch("s3://models/big.bin", cache)
    second = None
    try:
        wait_until(s3_proxy.stalled.is_set, 30, what="first download under way")
        asked = len(s3_proxy.requests)
        second = start_fetch("s3://models/big.bin", cache)
        # the second replica has seen the object is not cached yet; now it waits for the lock
        wait_until(lambda: len(s3_proxy.requests) > asked, 30, what="second replica asking")
        s3_proxy.release()
        outputs = [p.communicate(timeout=60) for p in (first, second)]
    finally:
        for process in (first, second):
            if process is not None:
                stop(process)

    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    paths = {out.decode().strip() for out, _ in outputs}
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == data
    assert sum(err.count(b"downloading") for _, err in outputs) == 1
    assert s3_proxy.object_gets("big.bin") == 1


def test_killed_download_leaves_nothing_that_looks_complete(s3_proxy, s3, bucket, cache):
    data = os.urandom(1_000_000)
    s3.put_object(Bucket=bucket, Key="model.bin", Body=data)
    s3_proxy.stall()
    process = start_fetch("s3://models/model.bin", cache)
    try:
        wait_until(s3_proxy.stalled.is_set, 30, what="download under way")
    finally:
        stop(process, sig=signal.SIGKILL)
    s3_proxy.release()
    assert not [p for p in cache.rglob("model.bin") if not p.parent.name.startswith(".tmp-")]

    path = fetch("s3://models/model.bin", cache)

    assert path.read_bytes() == data
    assert not list(path.parent.parent.glob(".tmp-*"))  # the leftover was removed
