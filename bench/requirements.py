"""What a project's requirements.txt adds to a replica's start, and pip against uv.

One run starts what it needs and stops it at the end: a private Redis (embedded, no
persistence) on a free 127.0.0.1 port and a temp ``INFERQ_HOME``. It prints two tables.

1. **Installers**, the step in which pip and uv differ: for each requirements set, the same
   install that a replica runs (``--target`` a new folder, the replica's loaded packages as
   constraints) with ``python -m pip install`` and with ``uv pip install``:

   - *cold*: an empty installer cache (a new host);
   - *cached*: the installer's cache filled by the cold run, a new folder (another
     requirements.txt that needs the same packages, or a host sharing a cache).

   A warm replica start (the folder exists) runs no installer at all, with either.

2. **Replica start** with uv (what inferq uses), from ``inferq worker`` spawned to its record
   saying ``live``: a project without requirements.txt; the same project with one, cold (new
   ``INFERQ_HOME``) and warm (a second replica: nothing is installed).

Sets: ``testpkg`` (one tiny wheel from a local folder, no network), and any PyPI names given
with ``--sets`` (e.g. ``requests``, ``pandas``): those need the network, and pip uses its own
configuration (pip.conf, PIP_*) where uv uses PyPI (or UV_*).

    .venv/bin/python bench/requirements.py [--sets testpkg requests pandas] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from wheels import make_testpkg

from inferq.deploy import deploy
from inferq.processes import spawn, stop, wait_until
from inferq.registry import Registry
from inferq.stack import EmbeddedRedis

PINS_SCRIPT = (
    "import inferq.workers.worker\n"
    "from inferq.workers.requirements import loaded_pins\n"
    "print('\\n'.join(loaded_pins()))\n"
)


def replica_pins() -> list[str]:
    """The constraints a replica passes (its loaded packages), from a fresh interpreter."""
    done = subprocess.run([sys.executable, "-P", "-c", PINS_SCRIPT], capture_output=True,
                          text=True, check=True)
    return done.stdout.split()


def install_command(installer: str, requirements: Path, constraints: Path, target: Path,
                    cache: Path) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if installer == "uv":
        from uv import find_uv_bin

        env["UV_CACHE_DIR"] = str(cache)
        return [find_uv_bin(), "pip", "install", "--target", str(target), "--python",
                sys.executable, "-r", str(requirements), "-c", str(constraints), "--quiet",
                "--no-progress"], env
    env["PIP_CACHE_DIR"] = str(cache)
    return [sys.executable, "-m", "pip", "install", "--target", str(target), "-r",
            str(requirements), "-c", str(constraints), "--quiet",
            "--disable-pip-version-check"], env


def time_installs(installer: str, requirements: Path, constraints: Path, work: Path,
                  rounds: int) -> tuple[list[float], list[float]]:
    cold, cached = [], []
    for n in range(rounds):
        cache = work / f"{installer}-cache-{n}"
        for samples, name in ((cold, "cold"), (cached, "cached")):
            target = work / f"{installer}-{n}-{name}"
            command, env = install_command(installer, requirements, constraints, target, cache)
            started = time.perf_counter()
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
            samples.append(time.perf_counter() - started)
            shutil.rmtree(target)
        shutil.rmtree(cache, ignore_errors=True)
    return cold, cached


def project(folder: Path, requirements: str | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "cortex.yaml").write_text(textwrap.dedent("""\
        - kind: deployment
          name: bench
        - kind: api
          name: start
          predictor:
            path: predictor.py
        """))
    (folder / "predictor.py").write_text("def predict(sample, metadata):\n    return 1\n")
    if requirements is not None:
        (folder / "requirements.txt").write_text(requirements)
    return folder


def time_replica_start(redis_url: str, home: Path, env_extra: dict[str, str]) -> float:
    registry = Registry(redis_url)
    env = {**os.environ, **env_extra, "INFERQ_BROKER_URL": redis_url, "INFERQ_HOME": str(home)}
    started = time.perf_counter()
    process = spawn([sys.executable, "-P", "-m", "inferq", "worker", "start"], env=env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: any(r.id.endswith(f"-{process.pid}") and r.status == "live"
                               for r in registry.replicas.of("start")), 600, interval=0.01,
                   what="the replica live")
        return time.perf_counter() - started
    finally:
        stop(process, timeout=30)
        registry.close()


def replica_starts(redis_url: str, work: Path, requirements: str, env_extra: dict[str, str],
                   rounds: int) -> dict[str, list[float]]:
    registry = Registry(redis_url)
    results: dict[str, list[float]] = {"no requirements.txt": [], "cold": [], "warm": []}
    try:
        for n in range(rounds):
            deploy(project(work / f"plain-{n}", None), registry)
            results["no requirements.txt"].append(
                time_replica_start(redis_url, work / f"home-plain-{n}", env_extra))
            deploy(project(work / f"reqs-{n}", requirements), registry)
            home = work / f"home-{n}"
            results["cold"].append(time_replica_start(redis_url, home, env_extra))
            results["warm"].append(time_replica_start(redis_url, home, env_extra))
    finally:
        registry.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["testpkg"],
                        help="requirement sets: testpkg (local, offline) or PyPI names")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pins = replica_pins()
    with tempfile.TemporaryDirectory(prefix="inferq-bench-reqs-") as tmp:
        work = Path(tmp)
        wheels = work / "wheels"
        make_testpkg(wheels, "1.0")
        constraints = work / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        print(f"{'set':<12} {'installer':<9} {'cold (median)':>14} {'cached (median)':>16}")
        for name in args.sets:
            requirements = work / f"{name}.txt"
            offline = name == "testpkg"
            requirements.write_text(
                f"--no-index\n--find-links {wheels}\ninferq-testpkg==1.0\n" if offline
                else name.replace(",", "\n") + "\n")
            for installer in ("pip", "uv"):
                cold, cached = time_installs(installer, requirements, constraints, work,
                                             args.rounds)
                print(f"{name:<12} {installer:<9} {statistics.median(cold):>13.2f}s "
                      f"{statistics.median(cached):>15.2f}s")
        server = EmbeddedRedis(work / "redis", persist=False)
        server.start()
        try:
            print()
            print(f"{'set':<12} {'replica start (uv)':<22} {'median':>8} {'min':>8}")
            for name in args.sets:
                offline = name == "testpkg"
                text = "inferq-testpkg==1.0\n" if offline else name.replace(",", "\n") + "\n"
                extra = {"UV_FIND_LINKS": str(wheels), "UV_OFFLINE": "1"} if offline else {}
                starts = replica_starts(server.url, work / f"start-{name}", text, extra,
                                        args.rounds)
                for kind, samples in starts.items():
                    print(f"{name:<12} {kind:<22} {statistics.median(samples):>7.2f}s "
                          f"{min(samples):>7.2f}s")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
