"""A project's ``requirements.txt``, installed once per host before its predictor is imported.

Each distinct environment gets a folder of its own, named by a hash of the file's content,
the Python version and the pins below::

    INFERQ_HOME/cache/requirements/
        <key>/          the installed packages (``uv pip install --target``), complete
        <key>.lock      flock held while installing, so replicas starting together install once
        .<key>-<pid>/   an install in progress; renamed to <key>/ when it succeeded

A file that inferq's own environment already satisfies (``numpy``, as the Cortex examples
list it) needs no install and no package index: the predictor uses inferq's packages.

inferq's own environment is never written to, two projects that need different versions of
one package each get theirs, and an unchanged file is never installed twice on a host. The
replica puts the folder on ``sys.path`` ahead of inferq's site-packages (and behind the
project's own ``python_path``), so the project's packages win for what its predictor imports.

Packages the replica has already imported when it installs (celery, kombu, redis, boto3 ...)
cannot be swapped inside a running interpreter. They are passed to the installer as
constraints (``name==version``): a requirement that contradicts one fails with the
installer's explanation, instead of running against a version it did not ask for, and a
package that merely depends on one gets a version that works with it.

The installer is ``uv`` (a dependency of inferq), chosen over pip for its speed: see the
README. It reads its own configuration from the environment (``UV_INDEX_URL``,
``UV_EXTRA_INDEX_URL``, ``UV_FIND_LINKS``, ``UV_OFFLINE``, ...); its cache is
``INFERQ_HOME/cache/uv`` unless ``UV_CACHE_DIR`` says otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import logging
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from inferq import stack
from inferq.errors import RequirementsError
from inferq.processes import spawn

log = logging.getLogger("inferq.requirements")

FILE_NAME = "requirements.txt"
INSTALLING = "installing requirements"  # the replica's detail while it installs
TAIL_LINES = 12  # of the installer's output, in the error
TIMEOUT_SECONDS = float(os.environ.get("INFERQ_REQUIREMENTS_TIMEOUT") or 1800)
# Installing tools: a project may need another setuptools than the one that happens to be
# imported (by a .pth file) in the replica.
_NEVER_PINNED = {"inferq", "pip", "setuptools", "wheel", "uv"}
_COMMENT = re.compile(r"(^|\s+)#.*$")
_CHATTER = re.compile(r"^Using (CPython|PyPy|Python) ")  # in the log, not in the reason


def listed(project_dir: Path) -> list[str]:
    """The requirement lines of the project's requirements.txt (no comments, no blanks);
    empty when there is none."""
    path = Path(project_dir) / FILE_NAME
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        line = _COMMENT.sub("", line).strip()  # pip's rule: "#" at the start or after a space
        if line:
            lines.append(line)
    return lines


def prepare(project: Path, *, api: str, on_install: Callable[[], None] | None = None
            ) -> Path | None:
    """The folder holding the project's requirements, installed first if this host has not
    yet; None when the project has no requirements.

    ``on_install`` is called before waiting for the lock and installing (not when the folder
    is there already). Raises :class:`RequirementsError` with the installer's last lines.
    """
    wanted = listed(project)
    if not wanted:
        return None
    if satisfied(wanted):
        log.info('api "%s": %s is satisfied by inferq\'s own packages: nothing to install',
                 api, FILE_NAME)
        return None
    requirements = (Path(project) / FILE_NAME).resolve()
    pins = loaded_pins()
    key = environment_key(requirements.read_bytes(), pins)
    root = stack.cache_dir("requirements")
    folder = root / key
    if folder.is_dir():
        return folder
    if on_install is not None:
        on_install()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f"{key}.lock"):
            if folder.is_dir():  # another replica installed it while this one waited
                log.info('api "%s": requirements installed by another replica (%s)',
                         api, key[:12])
                return folder
            _install(requirements, pins, root, key, api=api)
    except OSError as exc:  # e.g. INFERQ_HOME not writable, disk full
        raise RequirementsError(f'api "{api}": {FILE_NAME} could not be installed: {exc}') from exc
    return folder


def satisfied(lines: list[str]) -> bool:
    """Whether inferq's environment already has what every line asks for (``numpy``,
    ``scipy>=1.10``), as pip would say "Requirement already satisfied": then no install is
    needed, and no index either. Options, URLs and extras always go to the installer."""
    for line in lines:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:  # -r, -e, --index-url, --hash=..., a path or a URL
            return False
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        if requirement.url or requirement.extras:
            return False
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        if not requirement.specifier.contains(installed, prereleases=True):
            return False
    return True


def activate(folder: Path) -> None:
    """Put ``folder`` on ``sys.path`` ahead of inferq's packages (its ``.pth`` files run)."""
    path = str(folder)
    if path not in sys.path:
        sys.path.insert(0, path)
        site.addsitedir(path)  # already on sys.path: only processes the folder's .pth files
        importlib.invalidate_caches()


def environment_key(requirements: bytes, pins: list[str]) -> str:
    """The environment's name: what it was installed from, and for which interpreter."""
    digest = hashlib.sha256()
    for part in (requirements, sys.implementation.cache_tag.encode(),
                 sysconfig.get_platform().encode(), "\n".join(pins).encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:32]


def loaded_pins() -> list[str]:
    """``name==version`` of each installed distribution this process has imported from."""
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    installed.update(site.getsitepackages())
    owners = importlib.metadata.packages_distributions()
    pins = set()
    for name, module in list(sys.modules.items()):
        if "." in name or name not in owners:
            continue
        origin = getattr(module, "__file__", None)
        if not origin or not any(origin.startswith(p + os.sep) for p in installed):
            continue  # the standard library, or the project's own
        for dist in owners[name]:
            if dist.lower() in _NEVER_PINNED:
                continue
            try:
                pins.add(f"{dist}=={importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                continue
    return sorted(pins)


def _install(requirements: Path, pins: list[str], root: Path, key: str, *, api: str) -> None:
    """Install into a staging folder, then rename it to ``root/key`` (the lock is held)."""
    for stale in root.glob(f".{key}-*"):  # a killed install's leftovers
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
    staging = root / f".{key}-{os.getpid()}"
    staging.mkdir()  # there even when the file names no package (only options)
    constraints = root / f".{key}-{os.getpid()}.constraints.txt"
    constraints.write_text("".join(f"{pin}\n" for pin in pins))
    command = [
        _uv(), "pip", "install", "--target", str(staging), "--python", sys.executable,
        "--requirement", str(requirements), "--color", "never", "--no-progress",
    ]
    if pins:
        command += ["--constraint", str(constraints)]
    env = {**os.environ}
    env.setdefault("UV_CACHE_DIR", str(stack.cache_dir("uv")))
    log.info('api "%s": installing %s (%s)', api, FILE_NAME, ", ".join(listed(requirements.parent)))
    try:
        code, tail = _run(command, cwd=requirements.parent, env=env)
        if code != 0:
            shutil.rmtree(staging, ignore_errors=True)
            why = "timed out" if code is None else f"exited with code {code}"
            said = "\n".join(tail).lower()
            fixed = [pin for pin in pins if f"{pin.split('==')[0].lower()}==" in said]
            if fixed:
                tail.append(f"note: the replica itself runs on {', '.join(fixed)}; "
                            f"{FILE_NAME} cannot change that")
            raise RequirementsError(
                f'api "{api}": {FILE_NAME} could not be installed (uv {why}):\n' + "\n".join(tail)
            )
        staging.rename(root / key)
    finally:
        constraints.unlink(missing_ok=True)
    log.info('api "%s": %s installed (%s)', api, FILE_NAME, key[:12])


def _run(command: list[str], *, cwd: Path, env: dict[str, str]) -> tuple[int | None, list[str]]:
    """Run the installer, its output going to this replica's log line by line.

    Returns its exit code (None when it ran past :data:`TIMEOUT_SECONDS`) and its last lines.
    """
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        # Its own process group and a parent-death signal: a killed replica leaves no install.
        process = spawn(command, env=env, cwd=str(cwd), stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT)
    except OSError as exc:
        return 127, [f"cannot run {command[0]}: {exc}"]
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # uv and any build it started

    timer = threading.Timer(TIMEOUT_SECONDS, kill)
    timer.daemon = True
    timer.start()
    try:
        output = process.stdout
        assert output is not None  # started with stdout=PIPE
        for raw in iter(output.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            if line:
                log.info("uv: %s", line)
                if not _CHATTER.match(line):
                    tail.append(line)
        output.close()
        code = process.wait()
    finally:
        timer.cancel()
    return (None if timed_out.is_set() else code), list(tail)


def _uv() -> str:
    from uv import find_uv_bin  # the uv wheel's locator of its binary

    return find_uv_bin()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another replica may be installing it now
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
