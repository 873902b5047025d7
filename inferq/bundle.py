"""Project bundles: the project folder as a deterministic gzipped tar, named by its hash.

A bundle holds every file of the project except dot-files and dot-folders, ``__pycache__``
and ``*.pyc`` (as Cortex did). The same files always give the same bytes (sorted entries,
fixed times and owners), so the content hash is also the bundle's identity: redeploying an
unchanged project stores nothing new, and a replica on any host unpacks exactly what was
deployed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from inferq.configs import Problem
from inferq.errors import BundleTooLarge

#: Upper bound on the bundle's uncompressed size; models larger than this belong on S3.
MAX_BUNDLE_BYTES = int(os.environ.get("INFERQ_MAX_BUNDLE_BYTES") or 64 * 1024 * 1024)
#: Upper bound on its files: a virtualenv or node_modules left in the project is refused at
#: once, instead of being walked, packed, and unpacked by every replica on every host.
MAX_BUNDLE_FILES = int(os.environ.get("INFERQ_MAX_BUNDLE_FILES") or 10_000)


@dataclass(frozen=True)
class Bundle:
    digest: str  # sha256 of ``data``
    data: bytes  # gzipped tar
    files: tuple[str, ...]  # project-relative POSIX paths, sorted
    size: int  # uncompressed bytes of all files


def project_files(project_dir: Path, *, max_files: int | None = None) -> list[Path]:
    """The files that go into the bundle, sorted by their project-relative path.

    Raises :class:`BundleTooLarge` as soon as there are more than ``max_files``: the walk
    stops there (a folder of a million files, or a symlink loop, is not walked to its end).
    """
    found: list[Path] = []
    for root, dirs, files in os.walk(project_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in files:
            if name.startswith(".") or name.endswith(".pyc"):
                continue
            path = Path(root, name)
            if path.is_file():
                found.append(path)
            if max_files is not None and len(found) > max_files:
                raise BundleTooLarge([_too_many_files(project_dir, found, max_files)])
    return sorted(found, key=lambda p: p.relative_to(project_dir).as_posix())


def check(project_dir: str | os.PathLike, *, limit: int | None = None,
          max_files: int | None = None) -> dict[Path, int]:
    """The files that go into the bundle and their sizes; :class:`BundleTooLarge` over
    ``limit`` bytes or ``max_files`` files (default :data:`MAX_BUNDLE_BYTES`,
    :data:`MAX_BUNDLE_FILES`). ``deploy --dry-run`` checks this much, ``deploy`` then packs."""
    project_dir = Path(project_dir)
    limit = MAX_BUNDLE_BYTES if limit is None else limit
    files = project_files(project_dir,
                          max_files=MAX_BUNDLE_FILES if max_files is None else max_files)
    sizes = {f: f.stat().st_size for f in files}
    total = sum(sizes.values())
    if total > limit:
        raise BundleTooLarge([_too_large(project_dir, sizes, total, limit)])
    return sizes


def pack(project_dir: str | os.PathLike, *, limit: int | None = None,
         max_files: int | None = None) -> Bundle:
    """Bundle ``project_dir``; raise :class:`BundleTooLarge` over ``limit`` bytes or
    ``max_files`` files (see :func:`check`)."""
    project_dir = Path(project_dir)
    sizes = check(project_dir, limit=limit, max_files=max_files)
    files = list(sizes)
    total = sum(sizes.values())
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo(path.relative_to(project_dir).as_posix())
            info.size = sizes[path]
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.mtime = 0
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    data = gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)
    names = tuple(f.relative_to(project_dir).as_posix() for f in files)
    return Bundle(hashlib.sha256(data).hexdigest(), data, names, total)


def unpack(data: bytes, digest: str, cache_dir: Path) -> Path:
    """Unpack a bundle into ``cache_dir/<digest>`` once per host; return that folder.

    The folder appears atomically (unpacked beside it, then renamed), so replicas starting
    together on one host never see half a project.
    """
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"bundle {digest[:12]} is corrupt: its content does not match its hash")
    target = cache_dir / digest
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=cache_dir))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            _extract(tar, staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # lost a race to another replica: theirs is as good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _extract(tar: tarfile.TarFile, folder: Path) -> None:
    """Extract only plain files and folders inside ``folder`` (a bundle holds nothing else)."""
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 (and security backports)
        tar.extractall(folder, filter="data")
        return
    root = folder.resolve()
    for member in tar.getmembers():
        target = (folder / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
            raise ValueError(f"bundle member {member.name!r} is not a file inside the project")
    tar.extractall(folder)  # every member was checked above


def _too_large(project_dir: Path, sizes: dict[Path, int], total: int, limit: int) -> Problem:
    largest = sorted(sizes, key=lambda path: sizes[path], reverse=True)[:3]
    listing = ", ".join(f"{p.relative_to(project_dir).as_posix()} ({_mib(sizes[p])})"
                        for p in largest)
    return Problem(
        file=str(project_dir),
        path="",
        message=(
            f"the project is {_mib(total)}, over the {_mib(limit)} bundle limit "
            f"(largest: {listing}); put large models on S3 (model: s3://...) or raise "
            "INFERQ_MAX_BUNDLE_BYTES"
        ),
    )


def _too_many_files(project_dir: Path, found: list[Path], limit: int) -> Problem:
    # Where the files are (by top-level folder) is what the user needs to see to fix it.
    by_folder = Counter(_top_folder(path.relative_to(project_dir)) for path in found)
    crowded = ", ".join(f"{name} ({count:,})" for name, count in by_folder.most_common(3))
    return Problem(
        file=str(project_dir),
        path="",
        message=(
            f"the project has more than {limit:,} files, the bundle limit (most in: {crowded}); "
            "keep virtualenvs, node_modules and data sets out of the project folder (or in a "
            "dot-folder), put data on S3, or raise INFERQ_MAX_BUNDLE_FILES"
        ),
    )


def _top_folder(relative: Path) -> str:
    return f"{relative.parts[0]}/" if len(relative.parts) > 1 else "the project's top folder"


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"
