"""Persistent state of the embedded registry (all of its SQL): `Store` and its row types.

`base` holds the connection, schema, projects, users and tokens; `packages` the packages and
their files; `runs` the candidates and their run data; `models` the models and versions, and
the `Store` the server uses, which composes them.
"""

from mlregfs.server.store.base import (
    CANDIDATE_PREFIX,
    CHUNK,
    MODEL_EXPERIMENT_PREFIX,
    ROLES,
    ConflictError,
    InvalidError,
    NotFoundError,
    ProjectRef,
    Row,
    Staged,
    StagingFile,
    StoreError,
    hash_token,
    role_level,
)
from mlregfs.server.store.models import Store

__all__ = [
    "CANDIDATE_PREFIX",
    "CHUNK",
    "MODEL_EXPERIMENT_PREFIX",
    "ROLES",
    "ConflictError",
    "InvalidError",
    "NotFoundError",
    "ProjectRef",
    "Row",
    "Staged",
    "StagingFile",
    "Store",
    "StoreError",
    "hash_token",
    "role_level",
]
