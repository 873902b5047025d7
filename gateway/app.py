"""The gateway's Flask app: HTTP in, a task on the API's queue, the reply back.

Every answer to an API call is JSON. The status codes (the README, "HTTP"):

=====  ===================================================================================
200    the prediction
400    the body is not JSON, or nests deeper than 100 levels
404    no API at that endpoint
405    a method other than GET / POST on an endpoint
413    the body is over ``max_body`` bytes
500    ``predict()`` raised, or the replica died twice: ``prediction failed: <message>``
503    the API's queue is full, the broker is unreachable, or the API cannot serve now (no
       replica live and none coming: its status and reason in the body); ``Retry-After``
504    no replica answered within the API's ``compute.timeout``
=====  ===================================================================================
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from inferq import keys
from inferq.client import Client
from inferq.errors import (
    ApiUnavailable,
    BrokerUnavailable,
    InvalidSample,
    PredictionError,
    PredictionTimeout,
    QueueFull,
    RequestWithdrawn,
    UnknownAPI,
    UnknownRequest,
    some_of,
)
from inferq.gateway.batching import Batchers
from inferq.gateway.metrics import GatewayMetrics
from inferq.registry import DeployedApi
from inferq.samples import load_body

log = logging.getLogger("inferq.gateway")

DEFAULT_MAX_BODY = 10 * 1024 * 1024
API_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


class Routes:
    """Endpoint -> API, following deploys, redeploys and deletes without a restart.

    A lookup costs no round trip: it reads the client's API list, which queueing checks
    against the registry's change counter (``Client.submit(endpoint=...)``), so a moved or
    deleted endpoint is never served. An endpoint the list lacks is looked up afresh.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        # (the client's API list, its endpoint index): swapped whole, so threads agree
        self._index_of: tuple[dict | None, dict[str, DeployedApi]] = (None, {})

    def find(self, endpoint: str, *, fresh: bool = False) -> DeployedApi | None:
        """The API at ``endpoint``, or None; raises :class:`BrokerUnavailable` when it must
        ask the registry and cannot."""
        if not fresh:
            found = self._index(self._client.cached_apis()).get(endpoint)
            if found is not None:
                return found
        self._client.apis()  # re-reads the list if anything was deployed or deleted
        return self._index(self._client.cached_apis()).get(endpoint)

    def last_known(self, endpoint: str) -> str | None:
        """The API that was at ``endpoint`` when the broker last answered."""
        found = self._index_of[1].get(endpoint)
        return found.name if found is not None else None

    def endpoints(self) -> list[str]:
        return sorted(self._index_of[1])

    def _index(self, apis: dict[str, DeployedApi]) -> dict[str, DeployedApi]:
        indexed, by_endpoint = self._index_of
        if apis is not indexed:
            by_endpoint = {a.api.endpoint: a for a in apis.values()}
            self._index_of = (apis, by_endpoint)
        return by_endpoint


def create_app(client: Client, *, max_body: int = DEFAULT_MAX_BODY) -> Flask:
    """The gateway app over ``client`` (which owns the broker connection and reply listener)."""
    app = Flask("inferq.gateway")
    app.config["MAX_CONTENT_LENGTH"] = max_body
    routes = Routes(client)
    metrics = GatewayMetrics(client)
    batchers = Batchers(client)
    app.extensions["inferq.batchers"] = batchers  # closed by the server (gateway.server)

    @app.route("/healthz", methods=API_METHODS)
    def healthz() -> Response:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(["GET", "HEAD"])
        try:
            client.registry.ping()
        except BrokerUnavailable as exc:
            return _json({"status": "unavailable", "error": str(exc)}, 503, retry_after=1)
        return _json({"status": "ok"}, 200)

    @app.route("/metrics", methods=API_METHODS)
    def prometheus() -> Response:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(["GET", "HEAD"])
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    @app.route("/", defaults={"path": ""}, methods=API_METHODS)
    @app.route("/<path:path>", methods=API_METHODS)
    def api_call(path: str) -> Response:
        started = time.perf_counter()
        endpoint = "/" + path
        try:
            # A summary (GET) is rare: it asks the registry; a prediction (POST) is checked
            # against it when queued.
            deployed = routes.find(endpoint, fresh=request.method != "POST")
        except BrokerUnavailable as exc:
            request.environ["inferq.api"] = routes.last_known(endpoint)
            return _json(_error(str(exc)), 503, retry_after=1)
        if deployed is None:
            return _async_status(client, routes, endpoint)
        request.environ["inferq.api"] = deployed.name  # for the error bodies
        try:
            response = _serve(client, batchers, deployed, endpoint, routes)
        except HTTPException as exc:  # 413 from reading the body
            response = http_error(exc)
        metrics.observe(deployed.name, response.status_code, time.perf_counter() - started)
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        message = {
            413: f"the request body is over the {max_body} byte limit",
            405: f"{request.method} is not allowed here",
        }.get(code, exc.description or exc.name)
        response = _json(_error(message), code)
        if code == 405:
            valid = getattr(exc, "valid_methods", None) or ["GET", "HEAD", "POST"]
            # PUT, PATCH and DELETE reach the API route only to be answered 405 there
            allowed = [m for m in ("GET", "HEAD", "POST") if m in valid]
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        # Even a bug answers JSON (the README: every response to an API call is JSON).
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _json(_error(f"internal gateway error: {type(exc).__name__}: {exc}"), 500)

    return app


def _predict(client: Client, batchers: Batchers, deployed: DeployedApi, sample: Any,
             debug: bool, endpoint: str, still_wanted: Any) -> Any:
    """The prediction: alone, or in the API's next batch (``server_side_batching``; a debug
    request goes alone, so that its sample and prediction are logged as its own)."""
    batcher = None if debug else batchers.get(deployed)
    if batcher is None:
        return client.predict(deployed.name, sample, debug=debug, endpoint=endpoint,
                              still_wanted=still_wanted, checked=True)
    client.check_serving(deployed)
    timeout = deployed.api.compute.timeout
    request_id = uuid.uuid4().hex
    reply_to = keys.reply(f"{client.id}:{request_id}")
    deadline = time.monotonic() + timeout
    # A caller that gives up cannot take its sample out of a batch: it expires there.
    batcher.add(sample, (reply_to, request_id, time.time() + timeout)).result()
    return client.await_reply(deployed.name, reply_to, deadline, timeout,
                              still_wanted=still_wanted)


def _serve(client: Client, batchers: Batchers, deployed: DeployedApi, endpoint: str,
           routes: Routes) -> Response:
    name = deployed.name
    if request.method in ("GET", "HEAD"):
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
        response = _json(
            {"error": f"{request.method} is not allowed; POST a JSON sample (GET: a summary)",
             "api": name},
            405,
        )
        response.headers["Allow"] = "GET, HEAD, POST"
        return response
    body = request.get_data(cache=False)  # raises 413 over MAX_CONTENT_LENGTH
    try:
        sample = load_body(body)  # not JSON, or nested too deep
    except ValueError as exc:
        return _json({"error": str(exc), "api": name}, 400)
    debug = _flag("debug")
    wants_async = _flag("async")
    disconnected = request.environ.get("waitress.client_disconnected")
    still_wanted = (lambda: not disconnected()) if disconnected is not None else None
    try:
        if wants_async:
            request_id = client.enqueue(name, sample, endpoint=endpoint, checked=True)
            return _json({"id": request_id, "api": name}, 202)
        try:
            prediction = _predict(client, batchers, deployed, sample, debug, endpoint,
                                  still_wanted)
        except UnknownAPI:  # deleted or moved since the lookup: route again, afresh
            moved = routes.find(endpoint, fresh=True)
            if moved is None:
                return _not_found(endpoint, routes)
            name = moved.name
            request.environ["inferq.api"] = name
            prediction = _predict(client, batchers, moved, sample, debug, endpoint,
                                  still_wanted)
    except UnknownAPI as exc:
        return _json({"error": str(exc)}, 404)
    except QueueFull as exc:
        return _json({"error": str(exc), "api": name}, 503, retry_after=exc.retry_after)
    except ApiUnavailable as exc:
        return _json({"error": str(exc), "api": name, "status": exc.status,
                      "reason": exc.reason}, 503, retry_after=exc.retry_after)
    except BrokerUnavailable as exc:
        return _json({"error": str(exc), "api": name}, 503, retry_after=1)
    except RequestWithdrawn:
        return _json({"error": "the client went away", "api": name}, 499)
    except PredictionTimeout as exc:
        return _json({"error": f"timeout: {exc.reason}", "api": name}, 504)
    except InvalidSample as exc:  # NaN or Infinity, which JSON has not
        return _json({"error": exc.reason, "api": name}, 400)
    except PredictionError as exc:
        return _json({"error": f"prediction failed: {exc.reason}", "api": name}, 500)
    return Response(_dumps(prediction), 200, mimetype="application/json")


def _flag(name: str) -> bool:
    return request.args.get(name, "").lower() in ("1", "true", "yes")


def _async_status(client: Client, routes: Routes, path: str) -> Response:
    """``GET <endpoint>/<request id>``: an async request's state; else the 404 of ``path``."""
    endpoint, _, request_id = path.rpartition("/")
    try:
        owner = routes.find(endpoint, fresh=True) if endpoint and request_id else None
    except BrokerUnavailable as exc:
        return _json(_error(str(exc)), 503, retry_after=1)
    if owner is None:
        return _not_found(path, routes)
    request.environ["inferq.api"] = owner.name
    if request.method not in ("GET", "HEAD"):
        response = _json({"error": f"{request.method} is not allowed; GET an async request's "
                          "state", "api": owner.name}, 405)
        response.headers["Allow"] = "GET, HEAD"
        return response
    try:
        return _json(client.status(owner.name, request_id), 200)
    except UnknownRequest as exc:
        return _json({"error": str(exc), "api": owner.name}, 404)
    except BrokerUnavailable as exc:
        return _json({"error": str(exc), "api": owner.name}, 503, retry_after=1)


def _error(message: str) -> dict[str, str]:
    """An error body, naming the API when the request reached one."""
    body = {"error": message}
    api = request.environ.get("inferq.api")
    if api:
        body["api"] = api
    return body


def _not_found(endpoint: str, routes: Routes) -> Response:
    known = some_of(routes.endpoints())
    return _json({"error": f"no API at {endpoint} (deployed endpoints: {known})"}, 404)


def _json(payload: dict[str, Any], status: int, *, retry_after: int | None = None) -> Response:
    response = Response(_dumps(payload), status, mimetype="application/json")
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _dumps(value: Any) -> str:
    """Compact JSON and a newline, so a terminal's prompt starts on a line of its own."""
    return json.dumps(value, separators=(",", ":")) + "\n"
