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
from collections.abc import Callable
from dataclasses import dataclass
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
from inferq.gateway.connection import still_wanted
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
            found = self.cached(endpoint)
            if found is not None:
                return found
        self._client.apis()  # re-reads the list if anything was deployed or deleted
        return self.cached(endpoint)

    def cached(self, endpoint: str) -> DeployedApi | None:
        """The API at ``endpoint`` in the client's API list, without a round trip (None: look
        it up with :meth:`find`)."""
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
    """The gateway app over ``client`` (which owns the broker connection and reply listener).
    ``app.extensions["inferq.gateway"]`` is its :class:`Gateway` (closed by its server)."""
    app = Flask("inferq.gateway")
    app.config["MAX_CONTENT_LENGTH"] = max_body
    gateway = Gateway(client, max_body)
    routes, metrics = gateway.routes, gateway.metrics
    app.extensions["inferq.gateway"] = gateway

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
            return _async_status(gateway, endpoint)
        request.environ["inferq.api"] = deployed.name  # for the error bodies
        try:
            response = _serve(gateway, deployed, endpoint)
        except HTTPException as exc:  # 413 from reading the body
            response = http_error(exc)
        metrics.observe(request.environ["inferq.api"], response.status_code,
                        time.perf_counter() - started)
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
        return _response(internal_error(exc, request.environ.get("inferq.api")))

    return app


@dataclass(frozen=True)
class Reply:
    """An answer to an API call, before it is an HTTP response (Flask's, or the fast path's):
    its status, its JSON text, the headers beside the content type."""

    status: int
    body: str
    headers: tuple[tuple[str, str], ...] = ()


def reply(payload: Any, status: int, *, retry_after: int | None = None) -> Reply:
    headers = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
    return Reply(status, _dumps(payload), headers)


class Gateway:
    """What the Flask routes and the fast path (:mod:`inferq.gateway.fast`) share: the client,
    the routes, the metrics, the batchers and the body limit, and a prediction's answer."""

    def __init__(self, client: Client, max_body: int) -> None:
        self.client = client
        self.max_body = max_body
        self.routes = Routes(client)
        self.metrics = GatewayMetrics(client)
        self.batchers = Batchers(client)

    def close(self) -> None:
        self.batchers.close()

    def predict(self, deployed: DeployedApi, endpoint: str, body: bytes, *, debug: bool,
                wants_async: bool, still_wanted: Callable[[], bool] | None
                ) -> tuple[Reply, str]:
        """The answer to a sample POSTed to ``deployed`` at ``endpoint``, and the name of
        the API that answered it (an endpoint moved meanwhile is routed again)."""
        name = deployed.name
        try:
            sample = load_body(body)  # not JSON, or nested too deep
        except ValueError as exc:
            return reply({"error": str(exc), "api": name}, 400), name
        client = self.client
        try:
            if wants_async:
                request_id = client.enqueue(name, sample, endpoint=endpoint, checked=True)
                return reply({"id": request_id, "api": name}, 202), name
            try:
                prediction = self._predict(deployed, sample, debug, endpoint, still_wanted)
            except UnknownAPI:  # deleted or moved since the lookup: route again, afresh
                moved = self.routes.find(endpoint, fresh=True)
                if moved is None:
                    return self.not_found(endpoint), name
                name = moved.name
                prediction = self._predict(moved, sample, debug, endpoint, still_wanted)
        except UnknownAPI as exc:
            return reply({"error": str(exc)}, 404), name
        except QueueFull as exc:
            return reply({"error": str(exc), "api": name}, 503, retry_after=exc.retry_after), name
        except ApiUnavailable as exc:
            return reply({"error": str(exc), "api": name, "status": exc.status,
                          "reason": exc.reason}, 503, retry_after=exc.retry_after), name
        except BrokerUnavailable as exc:
            return reply({"error": str(exc), "api": name}, 503, retry_after=1), name
        except RequestWithdrawn:
            return reply({"error": "the client went away", "api": name}, 499), name
        except PredictionTimeout as exc:
            return reply({"error": f"timeout: {exc.reason}", "api": name}, 504), name
        except InvalidSample as exc:  # NaN or Infinity, which JSON has not
            return reply({"error": exc.reason, "api": name}, 400), name
        except PredictionError as exc:
            return reply({"error": f"prediction failed: {exc.reason}", "api": name}, 500), name
        return Reply(200, _dumps(prediction)), name

    def not_found(self, endpoint: str) -> Reply:
        known = some_of(self.routes.endpoints())
        return reply({"error": f"no API at {endpoint} (deployed endpoints: {known})"}, 404)

    def _predict(self, deployed: DeployedApi, sample: Any, debug: bool, endpoint: str,
                 still_wanted: Callable[[], bool] | None) -> Any:
        """The prediction: alone, or in the API's next batch (``server_side_batching``; a
        debug request goes alone, so that its sample and prediction are logged as its own)."""
        client = self.client
        batcher = None if debug else self.batchers.get(deployed)
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


def _serve(gateway: Gateway, deployed: DeployedApi, endpoint: str) -> Response:
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
    answer, name = gateway.predict(deployed, endpoint, body, debug=_flag("debug"),
                                   wants_async=_flag("async"),
                                   still_wanted=still_wanted(request.environ))
    request.environ["inferq.api"] = name
    return _response(answer)


def internal_error(exc: Exception, api: str | None) -> Reply:
    """The 500 of a bug: JSON like every answer, naming the API when the request reached one."""
    body = {"error": f"internal gateway error: {type(exc).__name__}: {exc}"}
    if api:
        body["api"] = api
    return reply(body, 500)


def _flag(name: str) -> bool:
    return request.args.get(name, "").lower() in ("1", "true", "yes")


def _async_status(gateway: Gateway, path: str) -> Response:
    """``GET <endpoint>/<request id>``: an async request's state; else the 404 of ``path``."""
    endpoint, _, request_id = path.rpartition("/")
    try:
        owner = gateway.routes.find(endpoint, fresh=True) if endpoint and request_id else None
    except BrokerUnavailable as exc:
        return _json(_error(str(exc)), 503, retry_after=1)
    if owner is None:
        return _response(gateway.not_found(path))
    request.environ["inferq.api"] = owner.name
    if request.method not in ("GET", "HEAD"):
        response = _json({"error": f"{request.method} is not allowed; GET an async request's "
                          "state", "api": owner.name}, 405)
        response.headers["Allow"] = "GET, HEAD"
        return response
    try:
        return _json(gateway.client.status(owner.name, request_id), 200)
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


def _json(payload: Any, status: int, *, retry_after: int | None = None) -> Response:
    return _response(reply(payload, status, retry_after=retry_after))


def _response(answer: Reply) -> Response:
    response = Response(answer.body, answer.status, mimetype="application/json")
    response.headers.extend(answer.headers)
    return response


def _dumps(value: Any) -> str:
    """Compact JSON and a newline, so a terminal's prompt starts on a line of its own."""
    return json.dumps(value, separators=(",", ":")) + "\n"
