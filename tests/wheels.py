"""Tiny wheels written by hand, for installs that need no network and no build tool.

A wheel is a zip archive with the package's files and a ``.dist-info`` folder (METADATA,
WHEEL, RECORD); pip and uv install it like any other, from a ``--find-links`` folder.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def make_wheel(folder: Path, name: str, version: str, files: dict[str, str],
               requires: tuple[str, ...] = ()) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` into ``folder``; ``files`` maps paths
    inside the wheel (``inferq_testpkg/__init__.py``) to their text."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    metadata = "".join(
        [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
        + [f"Requires-Dist: {r}\n" for r in requires]
    )
    contents = {
        **files,
        f"{info}/METADATA": metadata,
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: inferq-tests\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    record = []
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in contents.items():
            data = text.encode()
            archive.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{member},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def make_testpkg(folder: Path, version: str) -> Path:
    """``inferq-testpkg==<version>``: ``import inferq_testpkg; inferq_testpkg.VERSION``."""
    return make_wheel(folder, "inferq-testpkg", version, {
        "inferq_testpkg/__init__.py": f'VERSION = "{version}"\n',
    })
