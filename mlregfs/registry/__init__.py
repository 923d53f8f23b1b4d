"""Remote layer: knows GitLab and HTTP, knows nothing about inodes or FUSE."""

from mlregfs.registry.base import Registry, RegistryStats
from mlregfs.registry.types import (
    Candidate,
    FileOwner,
    Model,
    ModelVersion,
    ProjectInfo,
    RemoteFile,
)

__all__ = [
    "Candidate",
    "FileOwner",
    "Model",
    "ModelVersion",
    "ProjectInfo",
    "Registry",
    "RegistryStats",
    "RemoteFile",
]
