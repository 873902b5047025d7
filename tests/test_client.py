"""The Python client's batch path: bounded, ordered, lazy, with a progress bar."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import write_project

from inferq import Client, InvalidSample, PredictionError, UnknownAPI
from inferq.deploy import deploy

PREDICTOR = """
def predict(sample, metadata):
    return sample["n"] * 2
"""


@pytest.fixture
def doubler(registry, replicas, tmp_path):
    deploy(write_project(tmp_path / "p", """
    - kind: deployment
      name: math
    - kind: api
      name: doubler
      predictor: {path: predictor.py}
    """, {"predictor.py": PREDICTOR}), registry)
    replicas.start("doubler")
    with Client(registry.url) as client:
        yield client


@pytest.mark.parametrize("batch_size", [1, 4])
def test_map_over_an_endless_stream_keeps_only_its_window_in_flight(doubler, registry,
                                                                    batch_size):
    produced = 0
    deepest = 0

    def samples():
        nonlocal produced, deepest
        for n in itertools.count():
            produced += 1
            deepest = max(deepest, registry.queues.queued_samples("inferq.doubler"))
            yield {"n": n}

    results = doubler.map("doubler", samples(), batch_size=batch_size, window=8)
    first = list(itertools.islice(results, 200))
    assert first == [2 * n for n in range(200)]  # in input order
    # the stream is read only as far as the window (and the batch being filled) allows
    assert produced <= 200 + 8 + batch_size
    assert deepest <= 8


def test_map_shows_a_progress_bar(doubler, capsys):
    assert list(doubler.map("doubler", [{"n": n} for n in range(30)], progress=True)) == [
        2 * n for n in range(30)
    ]
    err = capsys.readouterr().err
    assert "doubler" in err and "30/30" in err


def test_an_unknown_api_fails_before_anything_is_queued(doubler, registry):
    with pytest.raises(UnknownAPI, match='no API named "tripler"'):
        doubler.map("tripler", ({"n": n} for n in range(10)))
    with pytest.raises(UnknownAPI):
        doubler.submit("tripler", {"n": 1})
    assert registry.queues.length("inferq.tripler") == 0


def test_one_client_serves_many_threads_at_once(doubler):
    with ThreadPoolExecutor(max_workers=300) as pool:
        answers = list(pool.map(lambda n: doubler.predict("doubler", {"n": n}, timeout=60),
                                range(600)))
    assert answers == [2 * n for n in range(600)]


def nested(levels: int, inner=None):
    sample = inner
    for _ in range(levels):
        sample = [sample]
    return sample


def test_a_sample_json_cannot_carry_fails_naming_the_api_before_anything_is_queued(
        doubler, registry):
    cycle: list = []
    cycle.append(cycle)
    problems = {
        "nests deeper than 100 levels": [{"n": nested(100_000)}, {"n": nested(100)}],
        "not JSON-serialisable: Object of type ndarray": [{"n": np.arange(3)}],
        "not JSON-serialisable: Circular reference": [cycle],
    }
    for message, samples in problems.items():
        for sample in samples:
            with pytest.raises(InvalidSample, match=f'^api "doubler": the sample .*{message}'):
                doubler.predict("doubler", sample)
            with pytest.raises(InvalidSample, match=message):
                doubler.submit("doubler", sample)
    assert registry.queues.length("inferq.doubler") == 0
    # At the limit a sample is sent (and here fails in predict(), as it would anywhere else).
    with pytest.raises(PredictionError, match="list indices must be integers"):
        doubler.predict("doubler", nested(99, {"n": 1}))


def test_map_names_the_index_of_a_sample_json_cannot_carry(doubler, registry):
    samples = [{"n": 1}, {"n": 2}, {"n": nested(5000)}, {"n": 4}]
    results = doubler.map("doubler", samples, batch_size=1, window=1)
    assert [next(results), next(results)] == [2, 4]
    with pytest.raises(InvalidSample, match=r'^api "doubler", sample 2: the sample nests deeper '
                                            "than 100 levels"):
        next(results)
    assert registry.queues.length("inferq.doubler") == 0


def test_map_carries_10_mb_samples_and_a_sample_over_256_mb_is_a_clear_error(doubler, registry):
    big = "a" * 10 * 1024 * 1024  # the gateway's default body limit, reached from Python
    answers = doubler.map("doubler", ({"n": big + str(n)} for n in range(3)), window=2)
    for n, answer in enumerate(answers):
        assert len(answer) == 2 * (len(big) + 1) and answer.endswith(f"a{n}")
    assert registry.queues.length("inferq.doubler") == 0
    too_big = {"n": "a" * (256 * 1024 * 1024)}
    with pytest.raises(InvalidSample, match=r'^api "doubler": the sample is 268,435,465 bytes of '
                                            "JSON, over the 256 MiB limit of a message"):
        doubler.predict("doubler", too_big)
    assert registry.queues.length("inferq.doubler") == 0
