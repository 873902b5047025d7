"""Deploying a project: validate it, store its bundle, record its APIs."""

from __future__ import annotations

import os

from inferq.bundle import pack
from inferq.configs import Deployment, load_project
from inferq.registry import DeployResult, Registry
from inferq.streams.endpoints import start_groups


def deploy(project_dir: str | os.PathLike, registry: Registry) -> tuple[Deployment, DeployResult]:
    """Validate ``project_dir`` and (re)deploy it; nothing is written when it is invalid.

    Raises :class:`ConfigError` (every problem listed), :class:`BundleTooLarge` or
    :class:`DeployError` (a name or endpoint owned by another deployment, a stream's source
    that cannot be read).
    """
    deployment = load_project(project_dir)
    bundle = pack(deployment.project_dir)
    start_groups(deployment, registry.url)
    registry.deployments.put_bundle(bundle.digest, bundle.data)
    return deployment, registry.deployments.deploy(deployment, bundle.digest)
