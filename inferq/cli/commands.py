"""The commands of ``inferq``, one function each; ``inferq.cli`` parses the arguments."""

from __future__ import annotations

import argparse
import json
import sys
import time

from inferq import __version__, stack
from inferq.errors import InferqError


def up(args: argparse.Namespace) -> int:
    from inferq.cli.up import Up

    return Up(args.project_dir, port=args.port, host=args.host).run()


def deploy(args: argparse.Namespace) -> int:
    if args.dry_run:
        from inferq.bundle import check
        from inferq.configs import load_project, to_yaml
        from inferq.workers.requirements import FILE_NAME, listed, satisfied

        deployment = load_project(args.project_dir)
        check(deployment.project_dir)  # the bundle limits a deploy applies
        sys.stdout.write(to_yaml(deployment))
        # As YAML comments, so the output stays a loadable cortex.yaml.
        wanted = listed(deployment.project_dir)
        if not wanted:
            print(f"# {FILE_NAME}: none (the predictor runs on inferq's own packages)")
        elif satisfied(wanted):
            print(f"# {FILE_NAME}: nothing to install, inferq's own packages satisfy it "
                  "(as replicas on hosts like this one will find):")
        else:
            print(f"# {FILE_NAME}: installed on each replica's host before the predictor is "
                  "imported")
        for line in wanted:
            print(f"#   {line}")
        return 0
    from inferq.deploy import deploy as deploy_project

    registry = _registry()
    deployment, result = deploy_project(args.project_dir, registry)
    for api in deployment.apis:
        print(f'api "{api.name}": {result.changes[api.name]} ({api.endpoint})')
    for name in result.removed:
        print(f'api "{name}": removed')
    if not result.changed:
        print(f'deployment "{deployment.name}" is up to date')
    return 0


def delete(args: argparse.Namespace) -> int:
    name = args.name
    if name is None:
        from inferq.configs import load_project
        from inferq.errors import ConfigError

        try:
            name = load_project(".").name
        except ConfigError as exc:
            raise InferqError(f"name the deployment to delete (inferq delete DEPLOYMENT_NAME; "
                              f"`inferq get` lists them), or run it in its project's folder "
                              f"({exc.problems[0]})") from None
    removed = _registry().deployments.delete(name)
    print(f'deleted deployment "{name}" ({", ".join(removed) or "no APIs"})')
    return 0


def get(args: argparse.Namespace) -> int:
    from inferq.cli.tables import (
        host_rows,
        render_api,
        render_hosts,
        render_jobs,
        render_streams,
        render_table,
        snapshot,
    )

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
            text = render_table(rows, _terminal_width())
            streams = render_streams(rows)
            if streams:
                text += "\n\n" + streams
            running = _running_jobs(registry)
            if running:
                text += "\n\n" + render_jobs(running)
        if args.watch:
            sys.stdout.write("\x1b[2J\x1b[H")
        print(text)
        if not args.watch:
            return 0
        time.sleep(1)


def _terminal_width() -> int | None:
    """The terminal's width, or None when the output is no terminal (nothing wraps there)."""
    import shutil

    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def _running_jobs(registry) -> list[dict]:
    from inferq.jobs import Jobs

    return [j.to_dict() for j in Jobs(registry).active()]


def job_submit(args: argparse.Namespace) -> int:
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
        from inferq.cli.tables import render_job

        state = job.wait(progress=True)
        print(render_job(state))
        return 0 if state["status"] == "succeeded" else 1


def job_get(args: argparse.Namespace) -> int:
    from inferq.cli.tables import render_job, render_jobs
    from inferq.jobs import Jobs

    jobs = Jobs(_registry())
    if args.job_id:
        state = jobs.require(args.job_id).to_dict()
        print(json.dumps(state, indent=2) if args.output == "json" else render_job(state))
        return 0
    states = [j.to_dict() for j in jobs.newest()]
    print(json.dumps(states, indent=2) if args.output == "json" else render_jobs(states))
    return 0


def job_stop(args: argparse.Namespace) -> int:
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


def logs(args: argparse.Namespace) -> int:
    registry = _registry()
    telemetry = registry.telemetry
    if registry.deployments.api(args.api) is None and not telemetry.read_logs(args.api, count=1):
        print(f'error: no API named "{args.api}" is deployed (see `inferq get`)', file=sys.stderr)
        return 1
    entries = telemetry.last_logs(args.api, max(args.tail, 1))
    last = entries[-1].id if entries else "0"  # follow on from the newest line
    entries = entries[-args.tail:] if args.tail > 0 else []
    for entry in entries:
        print(f"[{entry.replica}] {entry.line}", flush=True)
    while args.follow:
        for entry in telemetry.read_logs(args.api, last, block=1.0):
            print(f"[{entry.replica}] {entry.line}", flush=True)
            last = entry.id
    return 0


def worker(args: argparse.Namespace) -> int:
    from inferq.workers.supervisor import serve_child, supervise

    if args.serve:
        return serve_child(args.api, stack.broker_url(), args.serve, loglevel=args.loglevel)
    return supervise(args.api, stack.broker_url(), loglevel=args.loglevel,
                     wait_for_deploy=args.wait_for_deploy)


def gateway(args: argparse.Namespace) -> int:
    import logging

    from inferq.gateway.server import DEFAULT_PROCESSES, DEFAULT_THREADS, LOG_FORMAT, serve

    logging.basicConfig(level=args.loglevel, format=LOG_FORMAT)
    threads = _count(args.threads, "--threads", "INFERQ_GATEWAY_THREADS", DEFAULT_THREADS)
    processes = _count(args.processes, "--processes", "INFERQ_GATEWAY_PROCESSES",
                       DEFAULT_PROCESSES)
    serve(stack.broker_url(), host=args.host, port=args.port, threads=threads,
          processes=processes, max_body=args.max_body)
    return 0


def _count(given: int | None, option: str, variable: str, default: int) -> int:
    """A count from its option, else its environment variable, else ``default``; 1 or more."""
    import os

    if given is None:
        raw = os.environ.get(variable, "").strip()
        if not raw:
            return default
        if not raw.isdigit():
            raise InferqError(f"{variable}={raw!r}: expected a whole number of 1 or more")
        given, option = int(raw), variable
    if given < 1:
        raise InferqError(f"{option} must be 1 or more, not {given}")
    return given


def scaler(args: argparse.Namespace) -> int:
    import logging

    from inferq.scaler.host import declared_capacity
    from inferq.scaler.scaler import Scaler

    logging.basicConfig(level=args.loglevel,
                        format="%(asctime)s [scaler] %(levelname)s %(message)s")
    capacity = declared_capacity(args.cpu, args.mem, args.gpus)
    host = args.host_name or stack.host_name()
    return Scaler(stack.broker_url(), capacity, host, loglevel=args.loglevel,
                  echo_logs=None if args.quiet else sys.stderr).run()


def controller(args: argparse.Namespace) -> int:
    import logging

    from inferq.registry import Capacity
    from inferq.scaler.endpoint import ScalingEndpoint
    from inferq.scaler.scaler import Scaler

    logging.basicConfig(level=args.loglevel,
                        format="%(asctime)s [controller] %(levelname)s %(message)s")
    scaler = Scaler(stack.broker_url(), Capacity(cpu=0, mem=0), args.host_name or stack.host_name(),
                    loglevel=args.loglevel, tick=1.0, starts_replicas=False)
    watch = scaler.controller
    assert watch is not None
    endpoint = ScalingEndpoint(scaler.registry, watch.load, lambda: watch.ticked_at,
                               host=args.host, port=args.port).start()
    try:
        return scaler.run()
    finally:
        endpoint.close()


def export_kubernetes(args: argparse.Namespace) -> int:
    from inferq.cli.kubernetes import export

    return export(args.project_dir, image=args.image, namespace=args.namespace,
                  broker_url=args.broker_url, output=args.output)


def predict(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    from inferq.registry import Registry

    api = Registry(stack.broker_url()).deployments.api(args.api)
    if api is None:
        print(f'error: no API named "{args.api}" is deployed (see `inferq get`)', file=sys.stderr)
        return 1
    try:
        with open(args.sample_file, "rb") as handle:
            body = handle.read()
    except OSError as exc:
        raise InferqError(f"{args.sample_file}: cannot read it ({exc.strerror})") from None
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


def broker_url(args: argparse.Namespace) -> int:
    print(stack.broker_url())
    return 0


def version(args: argparse.Namespace) -> int:
    print(f"inferq {__version__}")
    return 0


def _registry():
    from inferq.registry import Registry

    registry = Registry(stack.broker_url())
    registry.ping()
    return registry
