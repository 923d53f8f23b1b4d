"""Persistent state of the embedded registry: one SQLite database plus a blob directory.

Layout of DATA:
    registry.sqlite3        WAL mode; safe for one server plus admin/test processes
    blobs/<project>/<package>/<file id>   file contents, written to tmp/ first then renamed
    tmp/                    staging area for uploads in progress
    signing.key             HMAC key of the redirect-mode storage URLs

`StoreBase` holds the connection (one per thread), the schema's creation, projects, users and
tokens; the other modules of this package add packages, runs and models on top of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlregfs.server.store.errors import ConflictError, InvalidError, NotFoundError
from mlregfs.server.store.schema import ID_OFFSETS, SCHEMA

ROLES = {"guest": 10, "reporter": 20, "developer": 30, "maintainer": 40, "owner": 50}
CANDIDATE_PREFIX = "candidate:"
MODEL_EXPERIMENT_PREFIX = "[model]"
ProjectRef = int | str
Row = dict[str, Any]


def _now() -> float:
    return time.time()


def role_level(role: str | int) -> int:
    """Access level of a role name ("developer") or number (30)."""
    if isinstance(role, int):
        return role
    try:
        return ROLES[role.lower()]
    except KeyError:
        raise InvalidError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}") from None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class StoreBase:
    """The database connection (one per thread), the schema, projects, users and tokens."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.blob_dir = self.data_dir / "blobs"
        self.tmp_dir = self.data_dir / "tmp"
        for d in (self.data_dir, self.blob_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / "registry.sqlite3"
        self._local = threading.local()
        self._init_schema()

    # ------------------------------------------------------------------ connection plumbing

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer takes the
            # lock up front and waits (busy timeout) instead of failing half-way.
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _init_schema(self) -> None:
        self._conn().executescript(SCHEMA)
        with self.tx() as db:
            for table, first in ID_OFFSETS.items():
                if not db.execute(
                    "SELECT 1 FROM sqlite_sequence WHERE name=?", (table,)
                ).fetchone():
                    db.execute(
                        "INSERT INTO sqlite_sequence(name, seq) VALUES(?, ?)", (table, first - 1)
                    )

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def one(self, sql: str, args: tuple[Any, ...] = ()) -> Row | None:
        r = self._conn().execute(sql, args).fetchone()
        return dict(r) if r else None

    def all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Row]:
        return [dict(r) for r in self._conn().execute(sql, args).fetchall()]

    @staticmethod
    def _next_iid(db: sqlite3.Connection, project_id: int, usage: str) -> int:
        db.execute(
            "INSERT OR IGNORE INTO internal_ids(project_id, usage, last_value) VALUES(?, ?, 0)",
            (project_id, usage),
        )
        db.execute(
            "UPDATE internal_ids SET last_value = last_value + 1 WHERE project_id=? AND usage=?",
            (project_id, usage),
        )
        row = db.execute(
            "SELECT last_value FROM internal_ids WHERE project_id=? AND usage=?",
            (project_id, usage),
        ).fetchone()
        return int(row[0])

    # ------------------------------------------------------------------ projects, users, tokens

    def project(self, ref: ProjectRef) -> Row | None:
        """A project by numeric id (int or digit string) or full path (case-insensitive)."""
        if isinstance(ref, int) or (isinstance(ref, str) and ref.lstrip("-").isdigit()):
            return self.one("SELECT * FROM projects WHERE id=?", (int(ref),))
        return self.one("SELECT * FROM projects WHERE path_lower=?", (ref.lower(),))

    def _project_id(self, ref: ProjectRef) -> int:
        p = self.project(ref)
        if p is None:
            raise NotFoundError(f"project {ref!r} not found")
        return int(p["id"])

    def create_project(self, path: str, visibility: str = "private") -> int:
        """Create `namespace/project`; returns its numeric id."""
        if visibility not in ("private", "internal", "public"):
            raise InvalidError(
                f"visibility must be private, internal or public, not {visibility!r}"
            )
        parts = path.split("/")
        if len(parts) < 2 or not all(parts):
            raise InvalidError(f"project path must look like namespace/project, not {path!r}")
        with self.tx() as db:
            if db.execute("SELECT 1 FROM projects WHERE path_lower=?", (path.lower(),)).fetchone():
                raise ConflictError(f"project {path} already exists")
            cur = db.execute(
                "INSERT INTO projects(path, path_lower, visibility, created_at) VALUES(?,?,?,?)",
                (path, path.lower(), visibility, _now()),
            )
            return int(cur.lastrowid or 0)

    def create_user(self, name: str, *, bot: bool = False) -> int:
        with self.tx() as db:
            if db.execute("SELECT 1 FROM users WHERE username=?", (name,)).fetchone():
                raise ConflictError(f"user {name} already exists")
            cur = db.execute(
                "INSERT INTO users(username, bot, created_at) VALUES(?,?,?)",
                (name, int(bot), _now()),
            )
            return int(cur.lastrowid or 0)

    def _user_id(self, user: int | str) -> int:
        row = (
            self.one("SELECT id FROM users WHERE id=?", (user,))
            if isinstance(user, int)
            else self.one("SELECT id FROM users WHERE username=?", (user,))
        )
        if row is None:
            raise NotFoundError(f"user {user!r} not found")
        return int(row["id"])

    def add_member(self, project: ProjectRef, user: int | str, role: str | int) -> None:
        """Make `user` a member of `project` with `role` (replaces an existing membership)."""
        pid, uid, level = self._project_id(project), self._user_id(user), role_level(role)
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO members(project_id, user_id, access_level) VALUES(?,?,?)",
                (pid, uid, level),
            )

    def access_level(self, project_id: int, user_id: int) -> int:
        row = self.one(
            "SELECT access_level FROM members WHERE project_id=? AND user_id=?",
            (project_id, user_id),
        )
        return int(row["access_level"]) if row else 0

    def create_token(
        self,
        project: ProjectRef | None,
        role: str | int | None = "developer",
        *,
        kind: str = "personal",
        scopes: tuple[str, ...] | list[str] = ("api",),
        member: bool = True,
        user: int | str | None = None,
        expires_at: float | None = None,
    ) -> str:
        """Create a token (for a new bot user unless `user` is given); returns the secret.

        The bot becomes a member of `project` with `role` unless member=False. A job token
        (kind="job") is only valid for `project`, like a CI_JOB_TOKEN.
        """
        if kind not in ("personal", "job"):
            raise InvalidError(f"token kind must be personal or job, not {kind!r}")
        bad = [s for s in scopes if s not in ("api", "read_api")]
        if bad or not scopes:
            raise InvalidError(f"token scopes must be api and/or read_api, not {list(scopes)!r}")
        pid = self._project_id(project) if project is not None else None
        if kind == "job" and pid is None:
            raise InvalidError("a job token needs a project")
        level = role_level(role) if role is not None else 0
        if user is None:
            uid = self.create_user(f"bot-{secrets.token_hex(6)}", bot=True)
        else:
            uid = self._user_id(user)
        if member and pid is not None and level:
            self.add_member(pid, uid, level)
        prefix = "glcbt-" if kind == "job" else "glpat-"
        token = prefix + secrets.token_urlsafe(20)
        with self.tx() as db:
            db.execute(
                "INSERT INTO tokens(digest, user_id, kind, scopes, project_id, expires_at,"
                " created_at)"
                " VALUES(?,?,?,?,?,?,?)",
                (hash_token(token), uid, kind, ",".join(scopes), pid, expires_at, _now()),
            )
        return token

    def revoke_token(self, token: str) -> None:
        """Revoke a token (as rotating a project or CI token does)."""
        with self.tx() as db:
            db.execute("UPDATE tokens SET revoked=1 WHERE digest=?", (hash_token(token),))

    def find_token(self, token: str) -> Row | None:
        """The token row for a secret, or None (unknown, revoked or expired)."""
        row = self.one("SELECT * FROM tokens WHERE digest=?", (hash_token(token),))
        if row is None or row["revoked"]:
            return None
        if row["expires_at"] is not None and row["expires_at"] < _now():
            return None
        return row
