"""Fixtures that run inferq's services for real: ``inferq scaler`` and ``inferq gateway``.

Hosts are declared (``--cpu``, ``--mem``, ``--gpus``) so GPU placement is tested without
GPUs. Every process is stopped at teardown, also when the test fails; a scaler's replicas
die with it (parent-death signal), which the teardown checks.
"""

from __future__ import annotations

import pytest
from helpers import Gateway, Scalers


@pytest.fixture
def scalers(redis_url, registry, tmp_path):
    pool = Scalers(redis_url, registry, tmp_path / "scaler-logs")
    yield pool
    pool.stop_all()


@pytest.fixture
def start_gateway(redis_url, tmp_path):
    """Start gateways (on the test's Redis unless told otherwise); all stopped at teardown."""
    started: list[Gateway] = []

    def start(*args: str, broker_url: str = redis_url) -> Gateway:
        gateway = Gateway(broker_url, tmp_path / f"gateway-{len(started)}.log", *args)
        started.append(gateway)
        gateway.wait_answering()
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway(start_gateway):
    """One gateway on the test's Redis."""
    return start_gateway()
