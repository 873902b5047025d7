"""Where a batch job reads its samples and writes its answers: local files or S3, streamed.

Input (:func:`open_source`): a JSON Lines file, a local folder of ``*.jsonl`` files, an
``s3://bucket/key`` object or an ``s3://bucket/prefix`` of ``.jsonl`` objects, in name order.
It is read as a stream of lines from a :class:`Position` (a file or key and a byte offset), so
a resumed job starts at its checkpoint and no input is ever held whole. A blank line is no
sample; a line that is not JSON is a sample that fails on its own (the dead letter shows it).

Output (:func:`open_sink`): a local file, appended, flushed and fsynced at each checkpoint and
cut back to it on resume; or an S3 object written as a multipart upload, a part each
:data:`PART_BYTES` of output, whose upload id and parts travel in the checkpoint, so a resumed
job goes on with the same upload. boto3's own configuration reaches S3 (credentials,
``AWS_ENDPOINT_URL_S3``), as for models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import botocore.exceptions

from inferq.errors import JobError
from inferq.s3 import error_code, s3_client, s3_problem
from inferq.samples import check_text

READ_BYTES = 1 << 20  # read this much of an input at a time
# An S3 output uploads a part each time this much is written (S3 takes parts of 5 MiB or more).
PART_BYTES = int(os.environ.get("INFERQ_JOB_PART_BYTES", 8 << 20))
S3_ATTEMPTS = 5  # boto3's tries per S3 call; a broken read stream is reopened where it broke
_DENIED = "check the AWS credentials boto3 finds"


@dataclass(frozen=True)
class Position:
    """Where reading goes on: ``offset`` bytes into ``part`` (a file or an S3 key)."""

    part: str = ""
    offset: int = 0

    def to_json(self) -> str:
        return json.dumps({"part": self.part, "offset": self.offset})

    @classmethod
    def from_json(cls, raw: str | None) -> Position:
        return cls(**json.loads(raw)) if raw else cls()


@dataclass
class Chunk:
    """Consecutive samples of the input, sent as one message.

    ``first`` is the index of its first sample in the whole input, ``size`` how many it
    holds, ``samples`` the JSON text of those that are JSON (all, unless ``bad`` maps the
    index of a line that is not to its text and error; checked, and sent as they are) and
    ``after`` where the next chunk starts.
    """

    number: int
    first: int
    size: int
    samples: list[str]
    bad: dict[int, tuple[str, str]]
    after: Position

    @property
    def indexes(self) -> list[int]:
        """The index of each of ``samples``."""
        return [i for i in range(self.first, self.first + self.size) if i not in self.bad]


class Source:
    """One job's input, as a sequence of parts (files, keys) read from a position."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def parts(self) -> list[str]:
        raise NotImplementedError

    def blocks(self, part: str, offset: int) -> Iterator[bytes]:
        raise NotImplementedError

    def chunks(self, position: Position, *, number: int, first: int,
               size_of: Callable[[int], int], max_bytes: int) -> Iterator[Chunk]:
        """The chunks from ``position`` on, numbered from ``number``, sample indexes from
        ``first``; chunk ``n`` ends after ``size_of(n)`` samples (asked when it begins) or
        ``max_bytes`` of lines (at least one sample). The same position and sizes give the
        same chunks, which is what lets a resumed job recognise the chunks it sent before."""
        samples: list[str] = []
        bad: dict[int, tuple[str, str]] = {}
        size = held = 0
        after = position
        batch_size = size_of(number)
        for line, after in self._lines(position):
            if not line.strip():
                continue
            try:
                text = line.decode()
                check_text(text)
                samples.append(text)
            except ValueError as exc:  # UnicodeDecodeError too
                text = line.decode("utf-8", errors="replace")
                bad[first + size] = (text, f"{after.part}: the line is not JSON ({exc}): "
                                           f"{_short(text)}")
            size += 1
            held += len(line)
            if size >= batch_size or held >= max_bytes:
                yield Chunk(number, first, size, samples, bad, after)
                number, first = number + 1, first + size
                samples, bad, size, held = [], {}, 0, 0
                batch_size = size_of(number)
        if size:
            yield Chunk(number, first, size, samples, bad, after)

    def count(self) -> int:
        """How many samples (non-blank lines) the whole input holds: read once, streamed."""
        return sum(1 for line, _ in self._lines(Position()) if line.strip())

    def _lines(self, position: Position) -> Iterator[tuple[bytes, Position]]:
        parts = self.parts()
        if position.part:
            if position.part not in parts:
                raise JobError(f"input {self.uri}: {position.part} is gone; the job read it up to "
                               f"byte {position.offset} and cannot go on without it")
            parts = parts[parts.index(position.part):]
        for part in parts:
            offset = position.offset if part == position.part else 0
            rest = b""
            for block in self.blocks(part, offset):
                block = rest + block
                start = 0
                while (end := block.find(b"\n", start)) >= 0:
                    offset += end - start + 1
                    yield block[start:end], Position(part, offset)
                    start = end + 1
                rest = block[start:]
            if rest:
                yield rest, Position(part, offset + len(rest))


class LocalSource(Source):
    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.path = Path(uri)
        if not self.path.exists():
            raise JobError(f"input {uri}: no such file or folder")
        if self.path.is_dir() and not self.parts():
            raise JobError(f"input {uri}: the folder holds no .jsonl file")

    def parts(self) -> list[str]:
        if self.path.is_dir():
            return sorted(str(p) for p in self.path.iterdir()
                          if p.suffix == ".jsonl" and p.is_file())
        return [str(self.path)]

    def blocks(self, part: str, offset: int) -> Iterator[bytes]:
        try:
            with open(part, "rb") as file:
                file.seek(offset)
                while block := file.read(READ_BYTES):
                    yield block
        except OSError as exc:
            raise JobError(f"input {part}: cannot read it: {exc}") from None


class S3Source(Source):
    """An object, or every ``.jsonl`` object under a prefix, in key order."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.bucket, self.key = split_s3(uri)
        self.client = s3_client(S3_ATTEMPTS)
        self._parts: list[str] | None = None
        if not self.parts():
            raise JobError(f"input {uri}: no .jsonl object under it")

    def parts(self) -> list[str]:
        if self._parts is None:
            self._parts = self._list()
        return self._parts

    def _list(self) -> list[str]:
        if self.key and not self.key.endswith("/"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self.key)
                return [self.key]
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) not in ("404", "NoSuchKey", "NotFound"):
                    raise self._error(exc) from None
        prefix = self.key if not self.key or self.key.endswith("/") else self.key + "/"
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix):
                keys.extend(o["Key"] for o in page.get("Contents", ())
                            if o["Key"].endswith(".jsonl"))
        except botocore.exceptions.ClientError as exc:
            raise self._error(exc) from None
        return sorted(keys)

    def blocks(self, key: str, offset: int) -> Iterator[bytes]:
        tries = 0
        while True:
            try:
                if offset:
                    body = self.client.get_object(Bucket=self.bucket, Key=key,
                                                  Range=f"bytes={offset}-")["Body"]
                else:
                    body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
                for block in body.iter_chunks(READ_BYTES):
                    offset += len(block)
                    tries = 0
                    yield block
                return
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) == "InvalidRange":
                    return  # read to its end already
                raise self._error(exc, key) from None
            except (botocore.exceptions.BotoCoreError, OSError) as exc:
                tries += 1  # the stream broke: open it again where it broke
                if tries >= S3_ATTEMPTS:
                    raise JobError(f"input s3://{self.bucket}/{key}: reading broke off "
                                   f"{tries} times at byte {offset}: {exc}") from None

    def _error(self, exc: botocore.exceptions.ClientError, key: str | None = None) -> JobError:
        where = f"s3://{self.bucket}/{key}" if key else self.uri
        return JobError(f"input {where}: {_describe(exc, self.bucket)}")


class Sink:
    """One job's output (or dead letter): written in order, checkpointed, then closed."""

    uri: str

    def write(self, text: str) -> bool:
        """Append ``text``; True when that made a checkpoint worth taking (S3: a part)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What :func:`open_sink` needs to go on from here (everything written is durable
        once this returns)."""
        raise NotImplementedError

    def seal(self) -> None:
        """Make everything written durable and part of :meth:`state`, before :meth:`close`
        (which a driver taking over from one that died while closing repeats)."""

    def close(self) -> None:
        """Finish the output: what was written is there, whole."""
        raise NotImplementedError


class LocalSink(Sink):
    def __init__(self, uri: str, state: dict[str, Any] | None, *, lazy: bool) -> None:
        self.uri = uri
        self.path = Path(uri)
        self.file: BinaryIO | None = None
        self.offset = int((state or {}).get("offset", 0))
        if state is not None and (state.get("created") or self.offset):
            self._open(resume=True)
        elif not lazy:
            self._open(resume=False)

    def _open(self, *, resume: bool) -> None:
        try:
            # Held open until close(): the sink appends to it between checkpoints.
            file = open(self.path, "r+b" if resume else "wb")  # noqa: SIM115
        except FileNotFoundError:
            raise JobError(f"output {self.uri}: no such file (it was removed since the job "
                           "began)" if resume else f"output {self.uri}: its folder does not "
                           "exist") from None
        except OSError as exc:
            raise JobError(f"output {self.uri}: cannot write it: {exc}") from None
        try:
            if resume:
                size = os.fstat(file.fileno()).st_size
                if size < self.offset:
                    raise JobError(f"output {self.uri}: it holds {size} bytes, fewer than the "
                                   f"{self.offset} the job wrote: it was changed outside the "
                                   "job, which cannot go on without them")
                file.truncate(self.offset)  # what was written after the checkpoint
                file.seek(self.offset)
        except BaseException:
            file.close()  # a job that fails here must not keep its output open
            raise
        self.file = file

    def write(self, text: str) -> bool:
        if self.file is None:
            self._open(resume=False)
        assert self.file is not None
        self.file.write(text.encode())
        return False

    def state(self) -> dict[str, Any]:
        if self.file is None:
            return {"offset": 0}
        self.file.flush()
        os.fsync(self.file.fileno())
        return {"offset": self.file.tell(), "created": True}

    def close(self) -> None:
        if self.file is not None:
            self.state()
            self.file.close()
            self.file = None


class S3Sink(Sink):
    def __init__(self, uri: str, state: dict[str, Any] | None, *, lazy: bool) -> None:
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.client = s3_client(S3_ATTEMPTS)
        state = state or {}
        self.upload: str | None = state.get("upload")
        self.parts: list[list] = [list(p) for p in state.get("parts", ())]
        self.buffer: list[str] = [state["tail"]] if state.get("tail") else []
        self.buffered = len(state.get("tail", "").encode())
        self.lazy = lazy

    def write(self, text: str) -> bool:
        self.buffer.append(text)
        self.buffered += len(text.encode())
        if self.buffered < PART_BYTES:
            return False
        self._upload_part()
        return True

    def state(self) -> dict[str, Any]:
        return {"upload": self.upload, "parts": self.parts, "tail": "".join(self.buffer)}

    def seal(self) -> None:
        if self.upload is not None and self.buffered:
            self._upload_part()  # the last part: what close() completes is in the checkpoint

    def close(self) -> None:
        if self.upload is None:
            if self.buffered or not self.lazy:
                self._call(self.client.put_object, Bucket=self.bucket, Key=self.key,
                           Body="".join(self.buffer).encode())
            return
        if self.buffered:
            self._upload_part()
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in self.parts]})
        except botocore.exceptions.ClientError as exc:
            # A driver that completed it and died before its last checkpoint (sealed, so the
            # parts it completed are the ones here): the object is there already.
            if error_code(exc) != "NoSuchUpload" or not self._exists():
                raise JobError(f"output {self.uri}: {_describe(exc, self.bucket)}") from None

    def _upload_part(self) -> None:
        if self.upload is None:
            self.upload = self._call(self.client.create_multipart_upload, Bucket=self.bucket,
                                     Key=self.key)["UploadId"]
        number = len(self.parts) + 1
        answer = self._call(self.client.upload_part, Bucket=self.bucket, Key=self.key,
                            UploadId=self.upload, PartNumber=number,
                            Body="".join(self.buffer).encode())
        self.parts.append([number, answer["ETag"]])
        self.buffer, self.buffered = [], 0

    def _exists(self) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key)
            return True
        except botocore.exceptions.ClientError:
            return False

    def _call(self, function: Any, **kwargs: Any) -> Any:
        try:
            return function(**kwargs)
        except botocore.exceptions.ClientError as exc:
            raise JobError(f"output {self.uri}: {_describe(exc, self.bucket)}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise JobError(f"output {self.uri}: S3 did not answer: {exc}") from None


def open_source(uri: str) -> Source:
    """The input at ``uri``; :class:`JobError` when there is nothing to read there."""
    return S3Source(uri) if uri.startswith("s3://") else LocalSource(uri)


def open_sink(uri: str, state: dict[str, Any] | None = None, *, lazy: bool = False) -> Sink:
    """The output at ``uri``, new (``state`` None) or going on from a checkpoint's ``state``;
    ``lazy``: nothing is created until something is written (the dead letter)."""
    if uri.startswith("s3://"):
        return S3Sink(uri, state, lazy=lazy)
    return LocalSink(uri, state, lazy=lazy)


def resolve(uri: str | os.PathLike) -> str:
    """``uri`` with a local path made absolute (a job may be driven from another directory)."""
    uri = os.fspath(uri)
    return uri if uri.startswith("s3://") else str(Path(uri).expanduser().resolve())


def default_output(input_uri: str) -> str:
    """Beside the input: ``in.jsonl`` -> ``in.predictions.jsonl``; a folder or prefix
    ``data/`` -> ``data.predictions.jsonl``."""
    base = input_uri.rstrip("/")
    if base.endswith(".jsonl"):
        base = base[: -len(".jsonl")]
    return base + ".predictions.jsonl"


def dead_letter_of(output_uri: str) -> str:
    """The failed samples' file beside an output: ``out.jsonl`` -> ``out.failed.jsonl``."""
    base = output_uri[: -len(".jsonl")] if output_uri.endswith(".jsonl") else output_uri
    return base + ".failed.jsonl"


def check_output(uri: str, source: Source) -> None:
    """:class:`JobError` unless ``uri`` can be written and is not part of the input."""
    if uri.startswith("s3://"):
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise JobError(f"output {uri}: name an object (s3://bucket/key.jsonl)")
        if isinstance(source, S3Source) and bucket == source.bucket:
            if key in source.parts():
                raise JobError(f"output {uri}: it is the job's own input")
            if source.parts() != [source.key] and key.startswith(source.key) \
                    and key.endswith(".jsonl"):
                raise JobError(f"output {uri}: it lies under the input prefix {source.uri}, "
                               "where the job would read it as input")
        try:
            s3_client(S3_ATTEMPTS).head_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError as exc:
            raise JobError(f"output {uri}: {_describe(exc, bucket, missing='bucket')}") from None
        return
    path = Path(uri)
    if str(path) in source.parts():
        raise JobError(f"output {uri}: it is the job's own input")
    if isinstance(source, LocalSource) and source.path.is_dir() and \
            path.parent == source.path and path.suffix == ".jsonl":
        raise JobError(f"output {uri}: it lies in the input folder {source.uri}, where the job "
                       "would read it as input")
    if path.is_dir():
        raise JobError(f"output {uri}: it is a folder; name a file")
    if not path.parent.is_dir():
        raise JobError(f"output {uri}: its folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise JobError(f"output {uri}: its folder {path.parent} is not writable")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise JobError(f"{uri}: the URL names no bucket (expected s3://bucket/key)")
    return bucket, key


def _describe(exc: botocore.exceptions.ClientError, bucket: str, *,
              missing: str = "key") -> str:
    return s3_problem(exc, bucket, missing=missing, denied=_DENIED)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
