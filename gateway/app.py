"""The gateway's Flask app: HTTP in, a task on the API's queue, the reply back.

Every answer to an API call is JSON. The status codes (PRODUCT.md §3):

=====  ===================================================================================
200    the prediction
400    the body is not JSON
404    no API at that endpoint
405    a method other than GET / POST on an endpoint
413    the body is over ``max_body`` bytes
500    ``predict()`` raised, or the replica died twice: ``prediction failed: <message>``
503    the API's queue is full or the broker is unreachable (with ``Retry-After``)
504    no replica answered within the API's ``compute.timeout``
=====  ===================================================================================
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from gateway.metrics import GatewayMetrics
from inferq.client import Client
from inferq.errors import (
    BrokerUnavailable,
    PredictionError,
    PredictionTimeout,
    QueueFull,
    UnknownAPI,
)
from inferq.registry import DeployedApi

DEFAULT_MAX_BODY = 10 * 1024 * 1024
DISCONNECT_CHECK_SECONDS = 0.5


class Routes:
    """Endpoint -> API, following deploys and deletes without a restart."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._by_endpoint: dict[str, DeployedApi] = {}

    def find(self, endpoint: str) -> DeployedApi | None:
        with self._lock:
            found = self._by_endpoint.get(endpoint)
        if found is None:
            self.refresh()  # a deploy we have not seen yet; one round trip, only on a miss
            with self._lock:
                found = self._by_endpoint.get(endpoint)
        return found

    def refresh(self) -> None:
        apis = self._client.apis()
        with self._lock:
            self._by_endpoint = {a.api.endpoint: a for a in apis}

    def endpoints(self) -> list[str]:
        with self._lock:
            return sorted(self._by_endpoint)


def create_app(client: Client, *, max_body: int = DEFAULT_MAX_BODY) -> Flask:
    """The gateway app over ``client`` (which owns the broker connection and reply listener)."""
    app = Flask("inferq.gateway")
    app.config["MAX_CONTENT_LENGTH"] = max_body
    routes = Routes(client)
    metrics = GatewayMetrics(client)

    @app.get("/healthz")
    def healthz() -> Response:
        try:
            client.registry.ping()
        except BrokerUnavailable as exc:
            return _json({"status": "unavailable", "error": str(exc)}, 503, retry_after=1)
        return _json({"status": "ok"}, 200)

    @app.get("/metrics")
    def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def api_call(path: str) -> Response:
        started = time.perf_counter()
        endpoint = "/" + path
        try:
            deployed = routes.find(endpoint)
        except BrokerUnavailable as exc:
            return _json({"error": str(exc)}, 503, retry_after=1)
        if deployed is None:
            return _not_found(endpoint, routes)
        response = _serve(client, deployed, routes)
        metrics.observe(deployed.name, response.status_code, time.perf_counter() - started)
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        message = {
            413: f"the request body is over the {max_body} byte limit",
            405: f"{request.method} is not allowed here; use POST (or GET for a summary)",
        }.get(exc.code, exc.description)
        response = _json({"error": message}, exc.code or 500)
        if exc.code == 405:
            response.headers["Allow"] = "GET, POST"
        return response

    return app


def _serve(client: Client, deployed: DeployedApi, routes: Routes) -> Response:
    name = deployed.name
    if request.method == "GET":
        url = request.url_root.rstrip("/") + deployed.api.endpoint
        return _json(
            {
                "api": name,
                "summary": f"POST a JSON sample to {url} to get a prediction "
                f"(curl {url} -X POST -H 'Content-Type: application/json' -d @sample.json)",
            },
            200,
        )
    if request.method != "POST":
        response = _json({"error": f"{request.method} is not allowed; use POST", "api": name}, 405)
        response.headers["Allow"] = "GET, POST"
        return response
    body = request.get_data(cache=False)  # raises 413 over MAX_CONTENT_LENGTH
    try:
        sample = json.loads(body)
    except ValueError as exc:
        return _json({"error": f"the request body is not JSON: {exc}", "api": name}, 400)
    debug = request.args.get("debug", "").lower() in ("1", "true", "yes")
    try:
        future = client.submit(name, sample, debug=debug)
    except UnknownAPI:
        routes.refresh()  # deleted since our last refresh
        return _not_found(deployed.api.endpoint, routes)
    except QueueFull as exc:
        return _json({"error": str(exc), "api": name}, 503, retry_after=exc.retry_after)
    except BrokerUnavailable as exc:
        return _json({"error": str(exc), "api": name}, 503, retry_after=1)
    return _await(client, future, name)


def _await(client: Client, future: Any, name: str) -> Response:
    """Wait for the reply; withdraw the request if the HTTP client goes away first."""
    disconnected = request.environ.get("waitress.client_disconnected")
    while True:
        try:
            prediction = future.result(timeout=DISCONNECT_CHECK_SECONDS)
        except FutureTimeout:
            if disconnected is not None and disconnected():
                client.cancel(future)
                return _json({"error": "the client went away", "api": name}, 499)
            continue
        except PredictionTimeout as exc:
            return _json({"error": f"timeout: {exc.reason}", "api": name}, 504)
        except PredictionError as exc:
            return _json({"error": f"prediction failed: {exc.reason}", "api": name}, 500)
        return Response(_dumps(prediction), 200, mimetype="application/json")


def _not_found(endpoint: str, routes: Routes) -> Response:
    known = ", ".join(routes.endpoints()) or "none"
    return _json({"error": f"no API at {endpoint} (deployed endpoints: {known})"}, 404)


def _json(payload: dict[str, Any], status: int, *, retry_after: int | None = None) -> Response:
    response = Response(_dumps(payload), status, mimetype="application/json")
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
