"""A batch job's inputs and outputs: chunks that a resumed job finds again, and outputs cut
back to their checkpoint. Local files here; S3 (moto's server) for the multipart output."""

from __future__ import annotations

import json
import os

import pytest
from helpers import S3_PART_MIN_BYTES

from inferq import JobError
from inferq.jobs.files import (
    Position,
    dead_letter_of,
    default_output,
    open_sink,
    open_source,
)


def chunks(source, position=None, **kwargs):
    position = Position() if position is None else position
    size = kwargs.pop("batch_size", 3)
    settings = {"number": 0, "first": 0, "size_of": lambda n: size, "max_bytes": 1 << 20,
                **kwargs}
    return list(source.chunks(position, **settings))


def test_a_folder_is_read_in_name_order_in_chunks_with_blank_and_bad_lines(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "b.jsonl").write_text('{"n": 4}\n\n{"n": 5}')  # no newline at its end
    (folder / "a.jsonl").write_text('{"n": 0}\n{"n": 1}\n[not json\n{"n": 3}\n')
    (folder / "notes.txt").write_text("not an input\n")
    source = open_source(str(folder))

    read = chunks(source)
    assert [(c.number, c.first, c.size) for c in read] == [(0, 0, 3), (1, 3, 3)]
    assert read[0].samples == ['{"n": 0}', '{"n": 1}']  # checked, kept as the text to send
    assert read[0].indexes == [0, 1]
    text, error = read[0].bad[2]
    assert text == "[not json" and "a.jsonl: the line is not JSON" in error
    assert [json.loads(sample) for sample in read[1].samples] == [{"n": 3}, {"n": 4}, {"n": 5}]
    assert source.count() == 6


def test_reading_from_a_chunks_end_gives_the_same_chunks_again(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(20)))
    source = open_source(str(path))
    whole = chunks(source, batch_size=4)
    resumed = chunks(source, whole[1].after, number=2, first=8, batch_size=4)
    assert [(c.number, c.first, c.samples) for c in resumed] == \
        [(c.number, c.first, c.samples) for c in whole[2:]]


def test_each_chunk_takes_the_size_asked_for_it(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(10)))
    read = chunks(open_source(str(path)), size_of=lambda n: n + 1)
    assert [c.size for c in read] == [1, 2, 3, 4]


def test_a_chunk_also_ends_at_its_byte_limit(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": "x" * 100}) + "\n" for _ in range(10)))
    assert [c.size for c in chunks(open_source(str(path)), batch_size=64, max_bytes=250)] == \
        [3, 3, 3, 1]


def test_nan_infinity_and_bad_utf8_are_no_json(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"x": NaN}\n{"x": 1e400}\n{"x": "\xff"}\n{"x": 1} trailing\n'
                     + b"[" * 5000 + b"]" * 5000 + b"\n")
    [chunk] = chunks(open_source(str(path)), batch_size=5)
    assert chunk.samples == []
    assert "NaN is not a JSON value" in chunk.bad[0][1]
    assert "1e400 is too large" in chunk.bad[1][1]
    assert "utf-8" in chunk.bad[2][1] and "Extra data" in chunk.bad[3][1]
    assert "nests deeper than 100 levels" in chunk.bad[4][1]  # no RecursionError


def test_a_local_output_resumes_cut_back_to_its_checkpoint(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = open_sink(str(path))
    sink.write("a\n")
    state = sink.state()
    sink.write("written after the checkpoint\n")  # a driver died here
    sink.file.flush()

    again = open_sink(str(path), state)
    again.write("b\n")
    again.close()
    assert path.read_text() == "a\nb\n"

    path.write_text("")  # someone emptied it: the job cannot go on
    with pytest.raises(JobError, match="fewer than the 2 the job wrote"):
        open_sink(str(path), state)


def test_an_output_that_cannot_go_on_is_not_left_open(tmp_path):
    """A job whose output was changed outside it fails, and the failed resume keeps no
    handle on the file, not even while its error is being reported."""
    path = tmp_path / "out.jsonl"
    sink = open_sink(str(path))
    sink.write("a\n")
    state = sink.state()
    sink.close()
    path.write_text("")
    with pytest.raises(JobError, match="changed outside the job") as caught:
        open_sink(str(path), state)
    assert str(path) not in _open_files(), "the failed resume left its output open"
    assert caught.value  # the error (and its traceback) still in hand above


def _open_files() -> set[str]:
    folder = "/proc/self/fd"
    return {os.readlink(os.path.join(folder, fd)) for fd in os.listdir(folder)
            if os.path.islink(os.path.join(folder, fd))}


def test_a_lazy_output_exists_only_once_written(tmp_path):
    path = tmp_path / "out.failed.jsonl"
    sink = open_sink(str(path), lazy=True)
    assert sink.state() == {"offset": 0}
    sink.close()
    assert not path.exists()


def test_outputs_default_beside_the_input():
    assert default_output("/data/in.jsonl") == "/data/in.predictions.jsonl"
    assert default_output("s3://b/data/") == "s3://b/data.predictions.jsonl"
    assert dead_letter_of("s3://b/out.jsonl") == "s3://b/out.failed.jsonl"
    assert dead_letter_of("/tmp/out") == "/tmp/out.failed.jsonl"


def test_an_s3_output_goes_on_with_the_same_multipart_upload(s3, monkeypatch):

    from inferq.jobs import files as jobfiles

    monkeypatch.setattr(jobfiles, "PART_BYTES", S3_PART_MIN_BYTES)
    s3.create_bucket(Bucket="out")
    line = "x" * 1023 + "\n"
    sink = open_sink("s3://out/scores.jsonl")
    uploaded = [sink.write(line) for _ in range(64)]
    assert uploaded[-1] and not any(uploaded[:-1])  # a part of 64 KiB
    sink.write("tail\n")
    state = json.loads(json.dumps(sink.state()))  # as the checkpoint keeps it

    again = open_sink("s3://out/scores.jsonl", state)
    again.write("more\n")
    again.close()
    body = s3.get_object(Bucket="out", Key="scores.jsonl")["Body"].read().decode()
    assert body == line * 64 + "tail\nmore\n"
    assert s3.list_multipart_uploads(Bucket="out").get("Uploads", []) == []


def test_an_s3_output_completed_by_a_driver_that_then_died_stays_whole(s3, monkeypatch):

    from inferq.jobs import files as jobfiles

    monkeypatch.setattr(jobfiles, "PART_BYTES", S3_PART_MIN_BYTES)
    s3.create_bucket(Bucket="out")
    line = "x" * 1023 + "\n"
    sink = open_sink("s3://out/scores.jsonl")
    for _ in range(64):
        sink.write(line)
    sink.write("tail\n")
    sink.seal()
    checkpoint = json.loads(json.dumps(sink.state()))  # the driver's last checkpoint
    sink.close()  # ... and the driver died right after

    open_sink("s3://out/scores.jsonl", checkpoint).close()  # the next driver ends it again
    body = s3.get_object(Bucket="out", Key="scores.jsonl")["Body"].read().decode()
    assert body == line * 64 + "tail\n"
