"""The ``inferq`` console script: the composition root, on top of every other part.

``main`` parses the arguments and runs one command of :mod:`inferq.cli.commands`. A failure a
user can meet (no broker, a stack that stopped, a missing file, a bad project) ends in one
line on stderr and exit status 1 (a bad argument: 2); the Python traceback shows only with
``inferq --debug COMMAND`` (or ``INFERQ_DEBUG=1``), or for a bug of inferq's own.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

import redis

from inferq.cli import commands
from inferq.errors import ConfigError, InferqError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    debug = args.show_traceback or os.environ.get("INFERQ_DEBUG", "") not in ("", "0")
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        return 130
    except (InferqError, redis.RedisError) as exc:
        if debug:
            traceback.print_exc()
        if isinstance(exc, ConfigError):
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            count = len(exc.problems)
            print(f"error: {count} problem{'s' if count != 1 else ''}; nothing was deployed",
                  file=sys.stderr)
        elif isinstance(exc, redis.RedisError):
            print(f"error: the broker stopped answering ({exc}); is the stack still running? "
                  "(inferq up, or INFERQ_BROKER_URL)", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferq", description="Serve Cortex-style predictors on Celery workers."
    )
    parser.add_argument("--debug", dest="show_traceback", action="store_true",
                        help="show the Python traceback of an error")
    sub = parser.add_subparsers(metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole stack in the foreground")
    up.add_argument("project_dir", nargs="?", metavar="PROJECT_DIR")
    up.add_argument("--port", type=int, default=8888, help="gateway port (default 8888)")
    up.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    up.set_defaults(handler=commands.up)

    dep = sub.add_parser("deploy", help="validate and (re)deploy a project")
    dep.add_argument("project_dir", nargs="?", default=".", metavar="PROJECT_DIR")
    dep.add_argument("--dry-run", action="store_true",
                     help="validate and print the resolved spec; needs no running stack")
    dep.set_defaults(handler=commands.deploy)

    get = sub.add_parser("get", help="show deployed APIs")
    get.add_argument("api", nargs="?", metavar="API_NAME")
    get.add_argument("--watch", action="store_true", help="refresh every second")
    get.add_argument("--output", choices=["table", "json"], default="table")
    get.add_argument("--hosts", action="store_true",
                     help="list the hosts (scalers) with capacity, replicas and heartbeat")
    get.set_defaults(handler=commands.get)

    delete = sub.add_parser("delete", help="remove a deployment")
    delete.add_argument("name", nargs="?", metavar="DEPLOYMENT_NAME",
                        help="default: the deployment of ./cortex.yaml")
    delete.set_defaults(handler=commands.delete)

    logs = sub.add_parser("logs", help="stream an API's replica logs")
    logs.add_argument("api", metavar="API_NAME")
    logs.add_argument("--tail", type=int, default=100,
                      help="lines of history to show first (default 100)")
    logs.add_argument("--no-follow", dest="follow", action="store_false",
                      help="print the history and exit instead of following new lines")
    logs.set_defaults(handler=commands.logs)

    worker = sub.add_parser("worker", help="run one replica of an API")
    worker.add_argument("api", metavar="API_NAME")
    worker.add_argument("--loglevel", default=os.environ.get("INFERQ_LOGLEVEL", "INFO"))
    # the supervisor starts the serving process with this (inferq.workers.supervisor)
    worker.add_argument("--serve", metavar="REPLICA_ID", help=argparse.SUPPRESS)
    worker.add_argument("--wait-for-deploy", action="store_true",
                        help="wait for the API to be deployed instead of exiting (Kubernetes)")
    worker.set_defaults(handler=commands.worker)

    gateway = sub.add_parser("gateway", help="run the HTTP gateway")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8888)
    gateway.add_argument("--threads", type=int,
                         help="threads of each gateway process: requests that wait for a "
                         "replica at once, and idle keep-alive connections (default 256, or "
                         "INFERQ_GATEWAY_THREADS)")
    gateway.add_argument("--processes", type=int,
                         help="gateway processes on the port, each with its threads (default "
                         "1, or INFERQ_GATEWAY_PROCESSES): one per core the replicas leave")
    gateway.add_argument("--max-body", type=int, default=10 * 1024 * 1024,
                         help="largest request body in bytes (default 10 MiB)")
    gateway.add_argument("--loglevel", default=os.environ.get("INFERQ_LOGLEVEL", "INFO"))
    gateway.set_defaults(handler=commands.gateway)

    scaler = sub.add_parser("scaler", help="run this host's replicas, scaled to the load")
    scaler.add_argument("--cpu", help="CPU this host offers replicas (default: detected), e.g. 4 "
                        "or 3500m")
    scaler.add_argument("--mem", help="memory this host offers replicas (default: detected), "
                        "e.g. 8Gi")
    scaler.add_argument("--gpus", type=int, help="GPUs this host offers (default: what NVML "
                        "reports; 0 without a driver)")
    scaler.add_argument("--host-name", help="this host's name among scalers (default: "
                        "INFERQ_HOST_NAME or the hostname)")
    scaler.add_argument("--quiet", action="store_true", help="do not echo replica logs")
    scaler.add_argument("--loglevel", default=os.environ.get("INFERQ_LOGLEVEL", "INFO"))
    scaler.set_defaults(handler=commands.scaler)

    controller = sub.add_parser(
        "controller", help="the scaler's work where Kubernetes runs the replicas: job "
        "drivers, recovery, rolling, statuses, and the number KEDA scales on")
    controller.add_argument("--host", default="127.0.0.1",
                            help="address of the scaling endpoint (default 127.0.0.1)")
    controller.add_argument("--port", type=int, default=8080,
                            help="port of the scaling endpoint (default 8080)")
    controller.add_argument("--host-name", help="this controller's name (default: "
                            "INFERQ_HOST_NAME or the hostname)")
    controller.add_argument("--loglevel", default=os.environ.get("INFERQ_LOGLEVEL", "INFO"))
    controller.set_defaults(handler=commands.controller)

    export = sub.add_parser("export", help="write what runs inferq elsewhere")
    targets = export.add_subparsers(metavar="TARGET")
    kubernetes = targets.add_parser(
        "kubernetes", help="Kubernetes manifests (KEDA 2.x) for the stack and a project's APIs")
    kubernetes.add_argument("project_dir", nargs="?", metavar="PROJECT_DIR",
                            help="the project whose APIs get replicas (default: the stack alone)")
    kubernetes.add_argument("--image", required=True,
                            help="the inferq image the cluster pulls (built from the Dockerfile)")
    kubernetes.add_argument("--namespace", default="default",
                            help="the namespace of every object (default: default)")
    kubernetes.add_argument("--broker-url", help="a Redis the cluster reaches, kept in a Secret "
                            "(default: a Redis StatefulSet with an append-only file)")
    kubernetes.add_argument("--output", default="-", metavar="DIR",
                            help="a folder for one file per object, or - to print them as "
                            "one YAML stream (default -)")
    kubernetes.set_defaults(handler=commands.export_kubernetes)

    predict = sub.add_parser("predict", help="send a JSON sample file to an API")
    predict.add_argument("api", metavar="API_NAME")
    predict.add_argument("sample_file", metavar="SAMPLE_FILE")
    predict.add_argument("--debug", action="store_true", help="log the sample and prediction")
    predict.set_defaults(handler=commands.predict)

    batch = sub.add_parser("batch", help="batch jobs: every sample of a data set through an API")
    actions = batch.add_subparsers(metavar="ACTION")
    submit = actions.add_parser("submit", help="submit a batch job (or resume one)")
    submit.add_argument("api", nargs="?", metavar="API_NAME")
    submit.add_argument("input", nargs="?", metavar="INPUT",
                        help="a JSON Lines file, a folder of them, or an s3:// object or prefix")
    submit.add_argument("--output", help="a local path or s3:// object for one JSON line per "
                        "sample (default: beside the input, <input>.predictions.jsonl)")
    submit.add_argument("--wait", action="store_true", help="show progress until the job ends")
    submit.add_argument("--resume", metavar="JOB_ID",
                        help="go on with a stopped or failed job from its checkpoint")
    submit.add_argument("--batch-size", type=int, default=64,
                        help="samples per message at most (default 64; fewer for a model "
                        "slow per sample)")
    submit.add_argument("--window", type=int, default=512,
                        help="samples in flight at most (default 512)")
    submit.set_defaults(handler=commands.job_submit)
    job_get = actions.add_parser("get", help="list batch jobs, or show one")
    job_get.add_argument("job_id", nargs="?", metavar="JOB_ID")
    job_get.add_argument("--output", choices=["table", "json"], default="table")
    job_get.set_defaults(handler=commands.job_get)
    job_stop = actions.add_parser("stop", help="stop a batch job (what was predicted is kept)")
    job_stop.add_argument("job_id", metavar="JOB_ID")
    job_stop.set_defaults(handler=commands.job_stop)

    broker = sub.add_parser("broker-url", help="print the broker URL the other commands use "
                            "(INFERQ_BROKER_URL, or the running inferq up's embedded Redis)")
    broker.set_defaults(handler=commands.broker_url)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(handler=commands.version)
    return parser


if __name__ == "__main__":
    sys.exit(main())
