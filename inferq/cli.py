"""The ``inferq`` console script."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from inferq import __version__, stack
from inferq.errors import ConfigError, InferqError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"error: {count} problem{'s' if count != 1 else ''}; nothing was deployed",
              file=sys.stderr)
        return 1
    except InferqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -- commands ----------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from inferq.up import Up

    return Up(args.project_dir, port=args.port, host=args.host).run()


def cmd_deploy(args: argparse.Namespace) -> int:
    if args.dry_run:
        from inferq.configs import load_project, to_yaml
        from inferq.workers.requirements import FILE_NAME, listed

        deployment = load_project(args.project_dir)
        sys.stdout.write(to_yaml(deployment))
        # As YAML comments, so the output stays a loadable cortex.yaml.
        wanted = listed(deployment.project_dir)
        print(f"# {FILE_NAME}: " + (
            "installed on each replica's host before the predictor is imported"
            if wanted else "none (the predictor runs on inferq's own packages)"))
        for line in wanted:
            print(f"#   {line}")
        return 0
    from inferq.deploy import deploy

    registry = _registry()
    deployment, result = deploy(args.project_dir, registry)
    for api in deployment.apis:
        print(f'api "{api.name}": {result.changes[api.name]} ({api.endpoint})')
    for name in result.removed:
        print(f'api "{name}": removed')
    if not result.changed:
        print(f'deployment "{deployment.name}" is up to date')
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    name = args.name
    if name is None:
        from inferq.configs import load_project

        name = load_project(".").name
    removed = _registry().delete(name)
    print(f'deleted deployment "{name}" ({", ".join(removed) or "no APIs"})')
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from inferq.status import (host_rows, render_api, render_hosts, render_jobs, render_table,
                               snapshot)

    registry = _registry()
    while True:
        rows = host_rows(registry) if args.hosts else snapshot(registry, args.api)
        if args.output == "json":
            text = json.dumps(rows, indent=2)
        elif args.hosts:
            text = render_hosts(rows)
        elif args.api:
            text = render_api(rows[0], stack.gateway_url())
        else:
            text = render_table(rows)
            running = _running_jobs(registry)
            if running:
                text += "\n\n" + render_jobs(running)
        if args.watch:
            sys.stdout.write("\x1b[2J\x1b[H")
        print(text)
        if not args.watch:
            return 0
        time.sleep(1)


def _running_jobs(registry) -> list[dict]:
    from inferq.jobs import Jobs

    return [j.to_dict() for j in Jobs(registry).active()]


def cmd_batch_submit(args: argparse.Namespace) -> int:
    from inferq.client import Client

    with Client(_registry().url) as client:
        if args.resume:
            if args.api or args.input:
                print("error: --resume JOB_ID takes no API_NAME or INPUT (the job has them)",
                      file=sys.stderr)
                return 2
            job = client.job(args.resume).resume()
            print(f"job {job.id}: queued again; it goes on from its checkpoint")
        else:
            if not (args.api and args.input):
                print("error: batch submit needs API_NAME and INPUT (or --resume JOB_ID)",
                      file=sys.stderr)
                return 2
            try:
                job = client.batch(args.api, args.input, args.output,
                                   batch_size=args.batch_size, window=args.window)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            state = job.status()
            print(f"job {job.id}: submitted ({state['input']} -> {state['output']})")
        if not args.wait:
            print(f"follow it with: inferq batch get {job.id}")
            return 0
        from inferq.status import render_job

        state = job.wait(progress=True)
        print(render_job(state))
        return 1 if state["status"] == "failed" else 0


def cmd_batch_get(args: argparse.Namespace) -> int:
    from inferq.jobs import Jobs
    from inferq.status import render_job, render_jobs

    jobs = Jobs(_registry())
    if args.job_id:
        state = jobs.require(args.job_id).to_dict()
        print(json.dumps(state, indent=2) if args.output == "json" else render_job(state))
        return 0
    states = [j.to_dict() for j in jobs.list()]
    print(json.dumps(states, indent=2) if args.output == "json" else render_jobs(states))
    return 0


def cmd_batch_stop(args: argparse.Namespace) -> int:
    from inferq.jobs import Jobs

    status = Jobs(_registry()).stop(args.job_id)
    if status == "stopped":
        print(f"job {args.job_id}: stopped")
    elif status == "running":
        print(f"job {args.job_id}: stopping (what was predicted is kept; resume it with "
              f"`inferq batch submit --resume {args.job_id}`)")
    else:
        print(f"job {args.job_id}: already {status}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    registry = _registry()
    if registry.api(args.api) is None and not registry.read_logs(args.api, count=1):
        print(f'error: no API named "{args.api}" is deployed (see `inferq get`)', file=sys.stderr)
        return 1
    entries = registry.last_logs(args.api, max(args.tail, 1))
    last = entries[-1][0] if entries else "0"  # follow on from the newest line
    entries = entries[-args.tail:] if args.tail > 0 else []
    for _, replica, line in entries:
        print(f"[{replica}] {line}", flush=True)
    while args.follow:
        for entry_id, replica, line in registry.read_logs(args.api, last, block=1.0):
            print(f"[{replica}] {line}", flush=True)
            last = entry_id
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from inferq.workers.supervisor import serve_child, supervise

    if args.serve:
        return serve_child(args.api, stack.broker_url(), args.serve, loglevel=args.loglevel)
    return supervise(args.api, stack.broker_url(), loglevel=args.loglevel)


def cmd_gateway(args: argparse.Namespace) -> int:
    import logging

    from inferq.gateway.server import serve

    logging.basicConfig(level=args.loglevel, format="%(asctime)s [gateway] %(levelname)s %(message)s")
    serve(stack.broker_url(), host=args.host, port=args.port, threads=args.threads,
          max_body=args.max_body)
    return 0


def cmd_scaler(args: argparse.Namespace) -> int:
    import logging

    from inferq.scaler.host import declared_capacity
    from inferq.scaler.scaler import Scaler

    logging.basicConfig(level=args.loglevel, format="%(asctime)s [scaler] %(levelname)s %(message)s")
    capacity = declared_capacity(args.cpu, args.mem, args.gpus)
    host = args.host_name or stack.host_name()
    return Scaler(stack.broker_url(), capacity, host, loglevel=args.loglevel,
                  echo_logs=None if args.quiet else sys.stderr).run()


def cmd_predict(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    from inferq.registry import Registry

    api = Registry(stack.broker_url()).api(args.api)
    if api is None:
        print(f'error: no API named "{args.api}" is deployed (see `inferq get`)', file=sys.stderr)
        return 1
    with open(args.sample_file, "rb") as handle:
        body = handle.read()
    url = stack.gateway_url() + api.api.endpoint + ("?debug=true" if args.debug else "")
    call = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=api.api.compute.timeout + 10) as response:
            print(json.dumps(json.loads(response.read()), indent=2))
            return 0
    except urllib.error.HTTPError as exc:
        print(f"error: {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"error: the gateway at {url} does not answer ({exc.reason}); is `inferq up` "
              "running?", file=sys.stderr)
        return 1


def cmd_version(args: argparse.Namespace) -> int:
    print(f"inferq {__version__}")
    return 0


def _registry():
    from inferq.registry import Registry

    registry = Registry(stack.broker_url())
    registry.ping()
    return registry


# -- parser ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferq", description="Serve Cortex-style predictors on Celery workers."
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole stack in the foreground")
    up.add_argument("project_dir", nargs="?", metavar="PROJECT_DIR")
    up.add_argument("--port", type=int, default=8888, help="gateway port (default 8888)")
    up.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    up.set_defaults(handler=cmd_up)

    dep = sub.add_parser("deploy", help="validate and (re)deploy a project")
    dep.add_argument("project_dir", nargs="?", default=".", metavar="PROJECT_DIR")
    dep.add_argument("--dry-run", action="store_true",
                     help="validate and print the resolved spec; needs no running stack")
    dep.set_defaults(handler=cmd_deploy)

    get = sub.add_parser("get", help="show deployed APIs")
    get.add_argument("api", nargs="?", metavar="API_NAME")
    get.add_argument("--watch", action="store_true", help="refresh every second")
    get.add_argument("--output", choices=["table", "json"], default="table")
    get.add_argument("--hosts", action="store_true",
                     help="list the hosts (scalers) with capacity, replicas and heartbeat")
    get.set_defaults(handler=cmd_get)

    delete = sub.add_parser("delete", help="remove a deployment")
    delete.add_argument("name", nargs="?", metavar="DEPLOYMENT_NAME",
                        help="default: the deployment of ./cortex.yaml")
    delete.set_defaults(handler=cmd_delete)

    logs = sub.add_parser("logs", help="stream an API's replica logs")
    logs.add_argument("api", metavar="API_NAME")
    logs.add_argument("--tail", type=int, default=100,
                      help="lines of history to show first (default 100)")
    logs.add_argument("--no-follow", dest="follow", action="store_false",
                      help="print the history and exit instead of following new lines")
    logs.set_defaults(handler=cmd_logs)

    worker = sub.add_parser("worker", help="run one replica of an API")
    worker.add_argument("api", metavar="API_NAME")
    worker.add_argument("--loglevel", default=os.environ.get("INFERQ_LOGLEVEL", "INFO"))
    # the supervisor starts the serving process with this (inferq.workers.supervisor)
    worker.add_argument("--serve", metavar="REPLICA_ID", help=argparse.SUPPRESS)
    worker.set_defaults(handler=cmd_worker)

    gateway = sub.add_parser("gateway", help="run the HTTP gateway")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8888)
    gateway.add_argument("--threads", type=int, default=256,
                         help="requests that can wait for a replica at once (default 256)")
    gateway.add_argument("--max-body", type=int, default=10 * 1024 * 1024,
                         help="largest request body in bytes (default 10 MiB)")
    gateway.add_argument("--loglevel", default=os.environ.get("INFERQ_LOGLEVEL", "INFO"))
    gateway.set_defaults(handler=cmd_gateway)

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
    scaler.set_defaults(handler=cmd_scaler)

    predict = sub.add_parser("predict", help="send a JSON sample file to an API")
    predict.add_argument("api", metavar="API_NAME")
    predict.add_argument("sample_file", metavar="SAMPLE_FILE")
    predict.add_argument("--debug", action="store_true", help="log the sample and prediction")
    predict.set_defaults(handler=cmd_predict)

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
    submit.set_defaults(handler=cmd_batch_submit)
    job_get = actions.add_parser("get", help="list batch jobs, or show one")
    job_get.add_argument("job_id", nargs="?", metavar="JOB_ID")
    job_get.add_argument("--output", choices=["table", "json"], default="table")
    job_get.set_defaults(handler=cmd_batch_get)
    job_stop = actions.add_parser("stop", help="stop a batch job (what was predicted is kept)")
    job_stop.add_argument("job_id", metavar="JOB_ID")
    job_stop.set_defaults(handler=cmd_batch_stop)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(handler=cmd_version)
    return parser


if __name__ == "__main__":
    sys.exit(main())
