"""inferq ships one top-level package, so a project's own ``configs`` or ``workers`` wins.

The repository keeps its folders (gateway/, workers/, scaler/, configs/); installed, they are
``inferq.gateway``, ``inferq.workers``, ... (generic top-level names collide with
the user's project modules, which share the interpreter in a replica).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import requests
from helpers import ROOT, write_project

from inferq.processes import wait_until
from inferq.stack import free_port

MODULES = ["inferq", "inferq.configs", "inferq.gateway", "inferq.workers", "inferq.scaler"]

CLASHING_PROJECT = {
    "configs/__init__.py": 'LABEL = "the project\'s configs"\n',
    "workers/__init__.py": 'LABEL = "the project\'s workers"\n',
    "scaler.py": 'LABEL = "the project\'s scaler"\n',
    "predictor.py": """
        import configs
        import scaler
        import workers


        def predict(sample, metadata):
            return [configs.LABEL, workers.LABEL, scaler.LABEL]
        """,
}


def test_a_wheel_installs_only_the_inferq_package(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".whl"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("inferq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"inferq"}
    for package in ("configs", "gateway", "workers", "scaler"):
        assert f"inferq/{package}/__init__.py" in names
    assert "inferq/configs/examples/iris/cortex.yaml" in names


def test_python_m_inferq_resolves_inferqs_modules_from_any_directory(tmp_path):
    write_project(tmp_path, "[]\n", {k: v for k, v in CLASHING_PROJECT.items()
                                     if k != "predictor.py"})
    script = "import importlib, json, sys; print(json.dumps({m: importlib.import_module(m)" \
             ".__file__ for m in sys.argv[1:]}))"
    found = subprocess.run(
        [sys.executable, "-c", script, *MODULES], cwd=tmp_path,  # cwd first on sys.path
        capture_output=True, text=True, timeout=60, check=True,
    )
    expected = {m: __import__(m, fromlist=["_"]).__file__ for m in MODULES}
    assert json.loads(found.stdout) == expected
    assert all(not Path(path).is_relative_to(tmp_path) for path in expected.values())
    version = subprocess.run([sys.executable, "-m", "inferq", "version"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60, check=False)
    assert version.returncode == 0, version.stderr


def test_a_project_with_its_own_configs_and_workers_is_served_by_inferq_up(run_up, tmp_path):
    project = write_project(tmp_path / "clash", """\
        - kind: deployment
          name: clash
        - kind: api
          name: names
          predictor:
            path: predictor.py
        """, CLASHING_PROJECT)
    port = free_port()
    # Started from inside the project with `python -m` (which puts the working directory
    # first on sys.path): the gateway and the scaler must still import inferq's own modules.
    up = run_up(command=[sys.executable, "-m", "inferq", "up", ".", "--port", str(port)],
                cwd=str(project))
    up.wait_for("inferq is up")

    def answer():
        try:
            response = requests.post(f"http://127.0.0.1:{port}/clash/names", json={}, timeout=30)
        except requests.ConnectionError:  # the gateway is still starting
            return None
        return response.json() if response.status_code == 200 else None

    labels = wait_until(answer, 90, what="the clashing project answers")
    assert labels == ["the project's configs", "the project's workers", "the project's scaler"]
    assert "ImportError" not in up.output()
