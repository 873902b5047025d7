"""Every Redis key inferq uses, spelled here and nowhere else.

Each concept of the registry (:mod:`inferq.registry`), the jobs (:mod:`inferq.jobs`) and the
wire format (:mod:`inferq.messages`) builds its keys with these functions; a key's type and
lifetime are in the table.

===========================  ======  ==========================================================
key (``inferq:`` + ...)      type    what, and how long it lives
===========================  ======  ==========================================================
``deployments``              set     deployment names
``deployment:<name>``        string  JSON: name, bundle hash, API names, updated_at
``apis``                     hash    API name -> JSON record (spec, version, bundle, ...)
``bundle:<sha256>``          string  a project bundle (gzipped tar); a replaced one lives 24 h
``changes``                  string  counter bumped by every deploy and delete
``lock:deploy``              string  lock serialising deploys and deletes (30 s at most)
``extra:<queue>``            string  samples queued beyond one per message (batch messages):
                                     the queue's sample count is LLEN + this
``sent:<request id>``        string  a synchronous request was queued (a resend after a broken
                                     connection is not queued again); lives its timeout
``reply:<client>[:<id>]``    list    replies for one client, or one request; 5 minutes
``async:<api>:<id>``         hash    an async request's status, result or error; its retention
``taken:<api>:<replica>``    list    the message a replica took and has not answered yet
``alive:<api>:<replica>``    string  a replica's liveness signal, renewed by its supervisor
                                     every 2 s; lives 10 s (``inferq controller``: a replica
                                     whose signal lapsed is dead, what it held is put back)
``reload:<api>:<replica>``   string  the controller asks a replica to serve the deployed
                                     version (a warm restart of its serving process); 60 s
``replicas:<api>``           hash    replica id -> JSON record (status, host, pid, ...)
``status:<api>``             string  JSON: the API's status as the leading scaler judged it
``usage:<api>``              hash    replica id -> JSON cpu (millicores), rss (bytes), gpu
``failure:<api>``            hash    host -> JSON: the last replica failure there
``stats:<api>``              hash    request counts by status class, latency sum, job samples
``tracker:<api>``            hash    tracked predictions: ``class:<label>`` counts and
                                     ``other``, or ``count``, ``sum``, ``min``, ``max``
``logs:<api>``               stream  the API's replica log lines (the newest 10,000)
``hosts``                    hash    host name -> JSON capacity, replicas, heartbeat
``leader``                   string  the host whose scaler decides (a 5 s lease)
``plan``                     string  JSON: replicas per API and host, what cannot be placed
``jobs``                     zset    batch job ids by submission time
``jobs:active``              set     the jobs that want a driver (queued or running)
``job:<id>``                 hash    a batch job's spec, status, counts and checkpoint
``job:<id>:chunks``          hash    chunk number -> when it was queued and its size
``job:<id>:results``         hash    chunk number -> its answer, written by a replica
``job:<id>:done``            list    chunk numbers answered, to wake the driver; 24 h
``job:<id>:driver``          string  the driver's lease (its token), 10 s, renewed
``stream:<api>``             hash    the API's stream consumer: entries answered, failed, dead-
                                     lettered; lag, pending, last entry, rate, when updated
``stream:<api>:consumer``    string  the stream consumer's lease (its token), 10 s, renewed
===========================  ======  ==========================================================

An API's Celery queue is ``inferq.<api>`` (a list; kombu's name, outside the prefix). A stream
an API consumes is the user's, named in its ``stream:`` section, with the consumer group
``inferq:<api>`` on it (see :mod:`inferq.streams`).
"""

from __future__ import annotations

PREFIX = "inferq:"
QUEUE_PREFIX = "inferq."  # an API's Celery queue: inferq.<api> (API names are unique)

REPLY_TTL_SECONDS = 300  # a reply nobody collects is gone after this
JOB_WAKE_TTL_SECONDS = 24 * 3600  # a job's wake-up list (its answers are kept regardless)
RETIRED_BUNDLE_TTL_SECONDS = 24 * 3600  # replicas of an old version may still fetch it
ALIVE_TTL_SECONDS = 10  # a replica's liveness signal lapses after this without renewal
RELOAD_TTL_SECONDS = 60  # a reload nobody took (its replica died meanwhile) goes away


def key(*parts: str) -> str:
    """``inferq:<part>:<part>...``."""
    return PREFIX + ":".join(parts)


def queue(api: str) -> str:
    """The Celery queue of an API."""
    return QUEUE_PREFIX + api


# -- deployments --------------------------------------------------------------------------------

def deployments() -> str:
    return key("deployments")


def deployment(name: str) -> str:
    return key("deployment", name)


def apis() -> str:
    return key("apis")


def bundle(digest: str) -> str:
    return key("bundle", digest)


def changes() -> str:
    return key("changes")


def deploy_lock() -> str:
    return key("lock", "deploy")


# -- queues and answers -------------------------------------------------------------------------

def extra(queue_name: str) -> str:
    """The counter of samples queued on ``queue_name`` beyond one per message."""
    return key("extra", queue_name)


def sent(request_id: str) -> str:
    return key("sent", request_id)


def reply(client_id: str) -> str:
    """The list a client (or one request of it) collects its replies from."""
    return key("reply", client_id)


def is_reply(name: str) -> bool:
    """Whether ``name`` is an inferq client's reply list (Celery sets a ``reply_to`` of its
    own on every message, which plain Celery callers never read)."""
    return name.startswith(PREFIX + "reply:")


def async_state(api: str, request_id: str) -> str:
    """The hash of an async request's state."""
    return key("async", api, request_id)


def is_async_state(name: str) -> bool:
    return name.startswith(PREFIX + "async:")


def taken(api: str, replica: str) -> str:
    """The list a replica takes its message into (kept until it answers)."""
    return key("taken", api, replica)


def alive(api: str, replica: str) -> str:
    """A replica's liveness signal (a key its supervisor renews before it lapses)."""
    return key("alive", api, replica)


def reload(api: str, replica: str) -> str:
    """The controller's request that a replica restart its serving process on the deployed
    version."""
    return key("reload", api, replica)


# -- replicas and telemetry ---------------------------------------------------------------------

def replicas(api: str) -> str:
    return key("replicas", api)


def replicas_prefix() -> str:
    return key("replicas", "")


def status(api: str) -> str:
    return key("status", api)


def usage(api: str) -> str:
    return key("usage", api)


def failure(api: str) -> str:
    return key("failure", api)


def stats(api: str) -> str:
    return key("stats", api)


def tracker(api: str) -> str:
    return key("tracker", api)


def logs(api: str) -> str:
    return key("logs", api)


# -- hosts --------------------------------------------------------------------------------------

def hosts() -> str:
    return key("hosts")


def leader() -> str:
    return key("leader")


def plan() -> str:
    return key("plan")


# -- batch jobs ---------------------------------------------------------------------------------

def jobs() -> str:
    """The sorted set of every job."""
    return key("jobs")


def active_jobs() -> str:
    """The set of jobs that want a driver."""
    return key("jobs", "active")


def job(job_id: str) -> str:
    return key("job", job_id)


def job_chunks(job_id: str) -> str:
    return key("job", job_id, "chunks")


def job_results(job_id: str) -> str:
    return key("job", job_id, "results")


def job_done(job_id: str) -> str:
    return key("job", job_id, "done")


def job_driver(job_id: str) -> str:
    return key("job", job_id, "driver")


# -- streams ------------------------------------------------------------------------------------

def stream_state(api: str) -> str:
    return key("stream", api)


def stream_consumer(api: str) -> str:
    return key("stream", api, "consumer")
