"""Persistent state of the embedded registry (all of its SQL): `Store` and its row types.

`schema` holds the tables; `base` the connection, projects, users and tokens; `packages` the
packages, their files and the staging of uploads; `runs` the experiments, candidates and
their run data; `models` the models and versions, and the `Store` the server uses, which
composes them. `errors` holds the refusals.
"""

from mlregfs.server.store.base import (
    CANDIDATE_PREFIX,
    MODEL_EXPERIMENT_PREFIX,
    ROLES,
    ProjectRef,
    Row,
    hash_token,
    role_level,
)
from mlregfs.server.store.errors import ConflictError, InvalidError, NotFoundError, StoreError
from mlregfs.server.store.models import Store
from mlregfs.server.store.packages import CHUNK, Staged, StagingFile

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
