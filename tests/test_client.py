"""The Python client's batch path: bounded, ordered, lazy, with a progress bar."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import write_project

from inferq import Client, UnknownAPI
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
            deepest = max(deepest, registry.queued_samples("inferq.doubler"))
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
    assert registry.queue_length("inferq.tripler") == 0


def test_one_client_serves_many_threads_at_once(doubler):
    with ThreadPoolExecutor(max_workers=300) as pool:
        answers = list(pool.map(lambda n: doubler.predict("doubler", {"n": n}, timeout=60),
                                range(600)))
    assert answers == [2 * n for n in range(600)]
