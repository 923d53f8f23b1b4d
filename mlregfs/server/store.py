"""Persistent state of the embedded registry: one SQLite database plus a blob directory.

Layout of DATA:
    registry.sqlite3        WAL mode; safe for one server plus admin/test processes
    blobs/<project>/<package>/<file id>   file contents, written to tmp/ first then renamed
    tmp/                    staging area for uploads in progress
    signing.key             HMAC key of the redirect-mode storage URLs

Id sequences start at different offsets so that an id of one kind never happens to be a
valid id of another (a client mixing up a model-version id and a package id gets a 404).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mlregfs.server.validation import (
    MODEL_NAME_RULE,
    SEMVER_RULE,
    ar_integer,
    encode_uri_component,
    parse_semver,
    valid_file_name,
    valid_model_name,
)

ROLES = {"guest": 10, "reporter": 20, "developer": 30, "maintainer": 40, "owner": 50}
CANDIDATE_PREFIX = "candidate:"
MODEL_EXPERIMENT_PREFIX = "[model]"
CHUNK = 1 << 20

ProjectRef = int | str
Row = dict[str, Any]

# first id handed out per table (sqlite_sequence holds "last used", hence the -1)
_ID_OFFSETS = {
    "projects": 1,
    "users": 1,
    "tokens": 1,
    "models": 201,
    "experiments": 401,
    "model_versions": 1001,
    "packages": 5001,
    "package_files": 9001,
    "candidates": 70001,
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users(
    id INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT UNIQUE NOT NULL,
    bot INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS projects(
    id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, path_lower TEXT UNIQUE NOT NULL,
    visibility TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS members(
    project_id INTEGER NOT NULL, user_id INTEGER NOT NULL, access_level INTEGER NOT NULL,
    PRIMARY KEY(project_id, user_id));
CREATE TABLE IF NOT EXISTS tokens(
    id INTEGER PRIMARY KEY AUTOINCREMENT, digest TEXT UNIQUE NOT NULL, user_id INTEGER NOT NULL,
    kind TEXT NOT NULL, scopes TEXT NOT NULL, project_id INTEGER, expires_at REAL,
    revoked INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS internal_ids(
    project_id INTEGER NOT NULL, usage TEXT NOT NULL, last_value INTEGER NOT NULL,
    PRIMARY KEY(project_id, usage));
CREATE TABLE IF NOT EXISTS models(
    id INTEGER PRIMARY KEY AUTOINCREMENT, project_id INTEGER NOT NULL, name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '', user_id INTEGER, tags TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL, updated_at REAL NOT NULL, UNIQUE(project_id, name));
CREATE TABLE IF NOT EXISTS experiments(
    id INTEGER PRIMARY KEY AUTOINCREMENT, project_id INTEGER NOT NULL, iid INTEGER NOT NULL,
    name TEXT NOT NULL, model_id INTEGER, user_id INTEGER, tags TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    UNIQUE(project_id, name), UNIQUE(project_id, iid));
CREATE TABLE IF NOT EXISTS model_versions(
    id INTEGER PRIMARY KEY AUTOINCREMENT, project_id INTEGER NOT NULL, model_id INTEGER NOT NULL,
    version TEXT NOT NULL, description TEXT NOT NULL DEFAULT '', major INTEGER NOT NULL,
    minor INTEGER NOT NULL, patch INTEGER NOT NULL, prerelease TEXT, package_id INTEGER,
    tags TEXT NOT NULL DEFAULT '[]', created_at REAL NOT NULL, updated_at REAL NOT NULL,
    UNIQUE(model_id, version));
CREATE TABLE IF NOT EXISTS candidates(
    id INTEGER PRIMARY KEY AUTOINCREMENT, project_id INTEGER NOT NULL, iid INTEGER NOT NULL,
    eid TEXT UNIQUE NOT NULL, experiment_id INTEGER NOT NULL, name TEXT, status TEXT NOT NULL,
    start_time INTEGER, end_time INTEGER, model_version_id INTEGER, user_id INTEGER,
    tags TEXT NOT NULL DEFAULT '[]', created_at REAL NOT NULL, updated_at REAL NOT NULL,
    UNIQUE(project_id, iid));
CREATE TABLE IF NOT EXISTS packages(
    id INTEGER PRIMARY KEY AUTOINCREMENT, project_id INTEGER NOT NULL, name TEXT NOT NULL,
    version TEXT NOT NULL, package_type TEXT NOT NULL DEFAULT 'ml_model',
    status TEXT NOT NULL DEFAULT 'default', created_at REAL NOT NULL, updated_at REAL NOT NULL,
    last_downloaded_at REAL);
CREATE INDEX IF NOT EXISTS packages_by_name ON packages(project_id, name, version);
CREATE TABLE IF NOT EXISTS package_files(
    id INTEGER PRIMARY KEY AUTOINCREMENT, package_id INTEGER NOT NULL, file_name TEXT NOT NULL,
    size INTEGER NOT NULL, file_sha256 TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'default',
    blob TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS files_by_name ON package_files(package_id, file_name);
CREATE TABLE IF NOT EXISTS candidate_metrics(
    id INTEGER PRIMARY KEY AUTOINCREMENT, candidate_id INTEGER NOT NULL, name TEXT NOT NULL,
    value REAL NOT NULL, step INTEGER, tracked_at INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS metrics_by_candidate ON candidate_metrics(candidate_id, name);
CREATE TABLE IF NOT EXISTS candidate_params(
    id INTEGER PRIMARY KEY AUTOINCREMENT, candidate_id INTEGER NOT NULL, name TEXT NOT NULL,
    value TEXT NOT NULL, created_at REAL NOT NULL, UNIQUE(candidate_id, name));
"""


_VERSION_SELECT = (
    "SELECT v.*, m.name AS model_name FROM model_versions v JOIN models m ON m.id=v.model_id"
)


class StoreError(Exception):
    """A store operation was refused; the message is meant for humans."""


class NotFoundError(StoreError):
    """The project, model, version, candidate or file does not exist."""


class ConflictError(StoreError):
    """The object already exists."""


class InvalidError(StoreError):
    """A name or version breaks GitLab's validation rules."""


@dataclass
class Staged:
    """A blob written to the staging area, not yet attached to a package file."""

    tmp: Path
    size: int
    sha256: str

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


class StagingFile:
    """Incremental writer into the staging area: hashes and counts while writing."""

    def __init__(self, tmp_dir: Path) -> None:
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
        self.path = Path(name)
        self._f: BinaryIO | None = os.fdopen(fd, "wb")
        self._h = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        assert self._f is not None
        self._f.write(chunk)
        self._h.update(chunk)
        self.size += len(chunk)

    def finish(self) -> Staged:
        assert self._f is not None
        self._f.close()
        self._f = None
        return Staged(self.path, self.size, self._h.hexdigest())

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


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


class Store:
    """SQLite + blob store. One connection per thread; every write is one short transaction."""

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
        self._conn().executescript(_SCHEMA)
        with self.tx() as db:
            for table, first in _ID_OFFSETS.items():
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

    # ------------------------------------------------------------------ models and versions

    def model(self, project_id: int, name: str) -> Row | None:
        return self.one("SELECT * FROM models WHERE project_id=? AND name=?", (project_id, name))

    def _model_row(self, project: ProjectRef, model: int | str) -> Row:
        pid = self._project_id(project)
        row = (
            self.one("SELECT * FROM models WHERE project_id=? AND id=?", (pid, model))
            if isinstance(model, int)
            else self.model(pid, model)
        )
        if row is None:
            raise NotFoundError(f"model {model!r} not found in project {project!r}")
        return row

    def create_model(
        self,
        project: ProjectRef,
        name: str,
        *,
        description: str = "",
        user_id: int | None = None,
        tags: list[dict[str, str]] | None = None,
    ) -> int:
        """Create a model and its default experiment `[model]<name>`; returns the model id."""
        if not valid_model_name(name):
            raise InvalidError(f"invalid model name {name!r}: {MODEL_NAME_RULE}")
        if len(description) > 10_000:
            raise InvalidError("description is too long (maximum is 10000 characters)")
        pid = self._project_id(project)
        now = _now()
        with self.tx() as db:
            if db.execute(
                "SELECT 1 FROM models WHERE project_id=? AND name=?", (pid, name)
            ).fetchone():
                raise ConflictError(f"model {name} already exists")
            cur = db.execute(
                "INSERT INTO models(project_id, name, description, user_id, tags, created_at,"
                " updated_at) VALUES(?,?,?,?,?,?,?)",
                (pid, name, description, user_id, json.dumps(tags or []), now, now),
            )
            model_id = int(cur.lastrowid or 0)
            exp_name = MODEL_EXPERIMENT_PREFIX + name
            exp = db.execute(
                "SELECT id FROM experiments WHERE project_id=? AND name=?", (pid, exp_name)
            ).fetchone()
            if exp:  # a leftover experiment of that name is adopted
                db.execute("UPDATE experiments SET model_id=? WHERE id=?", (model_id, exp[0]))
            else:
                self._insert_experiment(db, pid, exp_name, model_id=model_id, user_id=user_id)
            return model_id

    def _insert_experiment(
        self,
        db: sqlite3.Connection,
        pid: int,
        name: str,
        *,
        model_id: int | None = None,
        user_id: int | None = None,
        tags: list[dict[str, str]] | None = None,
    ) -> Row:
        iid = self._next_iid(db, pid, "ml_experiments")
        now = _now()
        cur = db.execute(
            "INSERT INTO experiments(project_id, iid, name, model_id, user_id, tags, created_at,"
            " updated_at) VALUES(?,?,?,?,?,?,?,?)",
            (pid, iid, name, model_id, user_id, json.dumps(tags or []), now, now),
        )
        return dict(db.execute("SELECT * FROM experiments WHERE id=?", (cur.lastrowid,)).fetchone())

    def create_experiment(
        self,
        project: ProjectRef,
        name: str,
        *,
        user_id: int | None = None,
        tags: list[dict[str, str]] | None = None,
    ) -> Row:
        pid = self._project_id(project)
        if not name:
            raise InvalidError("experiment name can't be blank")
        with self.tx() as db:
            if db.execute(
                "SELECT 1 FROM experiments WHERE project_id=? AND name=?", (pid, name)
            ).fetchone():
                raise ConflictError(f"experiment {name} already exists")
            return self._insert_experiment(db, pid, name, user_id=user_id, tags=tags)

    def experiment(
        self,
        project_id: int,
        *,
        iid: int | None = None,
        name: str | None = None,
        id: int | None = None,
    ) -> Row | None:
        if id is not None:
            return self.one("SELECT * FROM experiments WHERE id=?", (id,))
        if iid is not None:
            return self.one(
                "SELECT * FROM experiments WHERE project_id=? AND iid=?", (project_id, iid)
            )
        return self.one(
            "SELECT * FROM experiments WHERE project_id=? AND name=?", (project_id, name)
        )

    def create_version(
        self,
        project: ProjectRef,
        model: int | str,
        semver: str,
        *,
        description: str = "",
        tags: list[dict[str, str]] | None = None,
        user_id: int | None = None,
    ) -> int:
        """Create a model version with its package and hidden candidate; returns the version id.

        As GitLab's CreateModelVersionService: a candidate in the model's default experiment
        (linked to the version) and the ml_model package (model name, semver) are created too.
        """
        parsed = parse_semver(semver)
        if parsed is None:
            raise InvalidError(
                f"invalid version {semver!r}: must be semantic versioning: {SEMVER_RULE}"
            )
        m = self._model_row(project, model)
        pid = int(m["project_id"])
        now = _now()
        with self.tx() as db:
            if db.execute(
                "SELECT 1 FROM model_versions WHERE model_id=? AND version=?", (m["id"], semver)
            ).fetchone():
                raise ConflictError(f"version {semver} of model {m['name']} already exists")
            package_id = self._find_or_create_package(db, pid, m["name"], semver)
            cur = db.execute(
                "INSERT INTO model_versions(project_id, model_id, version, description, major,"
                " minor, patch, prerelease, package_id, tags, created_at, updated_at)"
                " VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    pid,
                    m["id"],
                    semver,
                    description,
                    *parsed,
                    package_id,
                    json.dumps(tags or []),
                    now,
                    now,
                ),
            )
            version_id = int(cur.lastrowid or 0)
            exp = db.execute("SELECT id FROM experiments WHERE model_id=?", (m["id"],)).fetchone()
            if exp is None:
                exp_id = self._insert_experiment(
                    db, pid, MODEL_EXPERIMENT_PREFIX + m["name"], model_id=m["id"]
                )["id"]
            else:
                exp_id = exp[0]
            self._insert_candidate(db, pid, exp_id, model_version_id=version_id, user_id=user_id)
            db.execute("UPDATE models SET updated_at=? WHERE id=?", (now, m["id"]))
            return version_id

    def version(self, project_id: int, version_id: int) -> Row | None:
        return self.one(
            _VERSION_SELECT + " WHERE v.project_id=? AND v.id=?",
            (project_id, version_id),
        )

    def versions(self, model_id: int) -> list[Row]:
        return self.all(
            _VERSION_SELECT + " WHERE v.model_id=? ORDER BY v.id",
            (model_id,),
        )

    def version_by_semver(self, model_id: int, semver: str) -> Row | None:
        return self.one(
            _VERSION_SELECT + " WHERE v.model_id=? AND v.version=?",
            (model_id, semver),
        )

    def latest_version(self, model_id: int) -> Row | None:
        """GitLab's `latest_version`: highest major, minor, patch (prerelease ignored)."""
        return self.one(
            _VERSION_SELECT
            + " WHERE v.model_id=? ORDER BY major DESC, minor DESC, patch DESC, v.id DESC LIMIT 1",
            (model_id,),
        )

    def delete_model(self, project_id: int, model_id: int) -> None:
        """Destroy a model with its versions and experiment; its packages go pending_destruction."""
        m = self.one("SELECT * FROM models WHERE project_id=? AND id=?", (project_id, model_id))
        if m is None:
            raise NotFoundError("model not found")
        with self.tx() as db:
            pkg_ids = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM packages WHERE project_id=? AND name=?"
                    " AND package_type='ml_model'",
                    (project_id, m["name"]),
                )
            ]
            for pkg in pkg_ids:
                self._destroy_package(db, pkg)
            exp_ids = [
                r[0] for r in db.execute("SELECT id FROM experiments WHERE model_id=?", (model_id,))
            ]
            for e in exp_ids:
                for table in ("candidate_metrics", "candidate_params"):
                    db.execute(
                        f"DELETE FROM {table} WHERE candidate_id IN"
                        " (SELECT id FROM candidates WHERE experiment_id=?)",
                        (e,),
                    )
                db.execute("DELETE FROM candidates WHERE experiment_id=?", (e,))
                db.execute("DELETE FROM experiments WHERE id=?", (e,))
            db.execute("DELETE FROM model_versions WHERE model_id=?", (model_id,))
            db.execute("DELETE FROM models WHERE id=?", (model_id,))

    def delete_version(self, project_id: int, version_id: int) -> None:
        """`Ml::DestroyModelVersionService`: the package goes pending_destruction, the version
        and its hidden candidate are removed."""
        v = self.one(
            "SELECT * FROM model_versions WHERE project_id=? AND id=?", (project_id, version_id)
        )
        if v is None:
            raise NotFoundError("model version not found")
        with self.tx() as db:
            if v["package_id"] is not None:
                self._destroy_package(db, int(v["package_id"]))
            for table in ("candidate_metrics", "candidate_params"):
                db.execute(
                    f"DELETE FROM {table} WHERE candidate_id IN"
                    " (SELECT id FROM candidates WHERE model_version_id=?)",
                    (version_id,),
                )
            db.execute("DELETE FROM candidates WHERE model_version_id=?", (version_id,))
            db.execute("DELETE FROM model_versions WHERE id=?", (version_id,))

    # ------------------------------------------------------------------ candidates

    def _insert_candidate(
        self,
        db: sqlite3.Connection,
        pid: int,
        experiment_id: int,
        *,
        model_version_id: int | None = None,
        name: str | None = None,
        start_time: int | None = None,
        user_id: int | None = None,
        tags: list[dict[str, str]] | None = None,
    ) -> Row:
        iid = self._next_iid(db, pid, "ml_candidates")
        now = _now()
        cur = db.execute(
            "INSERT INTO candidates(project_id, iid, eid, experiment_id, name, status, start_time,"
            " model_version_id, user_id, tags, created_at, updated_at)"
            " VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                pid,
                iid,
                str(uuid.uuid4()),
                experiment_id,
                name,
                "running",
                start_time,
                model_version_id,
                user_id,
                json.dumps(tags or []),
                now,
                now,
            ),
        )
        db.execute("UPDATE experiments SET updated_at=? WHERE id=?", (now, experiment_id))
        return dict(db.execute("SELECT * FROM candidates WHERE id=?", (cur.lastrowid,)).fetchone())

    def create_candidate(
        self,
        project: ProjectRef,
        *,
        model: str | None = None,
        experiment: str | int | None = None,
        name: str | None = None,
        start_time: int | None = None,
        user_id: int | None = None,
        tags: list[dict[str, str]] | None = None,
    ) -> int:
        """Create a candidate (run); returns its project-scoped iid.

        With `model`, it goes into the model's default experiment; with `experiment` (name, or
        iid as int) into that experiment, created by name if missing; else into "Default".
        """
        pid = self._project_id(project)
        with self.tx() as db:
            if model is not None:
                m = db.execute(
                    "SELECT id FROM models WHERE project_id=? AND name=?", (pid, model)
                ).fetchone()
                if m is None:
                    raise NotFoundError(f"model {model!r} not found")
                exp = db.execute("SELECT id FROM experiments WHERE model_id=?", (m[0],)).fetchone()
                exp_id = (
                    exp[0]
                    if exp
                    else self._insert_experiment(
                        db, pid, MODEL_EXPERIMENT_PREFIX + model, model_id=m[0]
                    )["id"]
                )
            elif isinstance(experiment, int):
                exp = db.execute(
                    "SELECT id FROM experiments WHERE project_id=? AND iid=?", (pid, experiment)
                ).fetchone()
                if exp is None:
                    raise NotFoundError(f"experiment {experiment} not found")
                exp_id = exp[0]
            else:
                ename = experiment or "Default"
                exp = db.execute(
                    "SELECT id FROM experiments WHERE project_id=? AND name=?", (pid, ename)
                ).fetchone()
                exp_id = exp[0] if exp else self._insert_experiment(db, pid, ename)["id"]
            c = self._insert_candidate(
                db, pid, exp_id, name=name, start_time=start_time, user_id=user_id, tags=tags
            )
            return int(c["iid"])

    def candidate(
        self, project_id: int, *, iid: int | None = None, eid: str | None = None
    ) -> Row | None:
        if eid is not None:
            return self.one(
                "SELECT * FROM candidates WHERE project_id=? AND eid=?", (project_id, eid)
            )
        return self.one("SELECT * FROM candidates WHERE project_id=? AND iid=?", (project_id, iid))

    def candidate_package_name(self, cand: Row) -> str:
        """The model name for a model's default experiment, else `ml_experiment_<exp iid>`."""
        exp = self.one("SELECT * FROM experiments WHERE id=?", (cand["experiment_id"],))
        assert exp is not None
        if exp["model_id"] is not None:
            m = self.one("SELECT name FROM models WHERE id=?", (exp["model_id"],))
            if m is not None:
                return str(m["name"])
        return f"ml_experiment_{exp['iid']}"

    def update_candidate(self, cand_id: int, **fields: Any) -> None:
        if not fields:
            return
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.tx() as db:
            db.execute(
                f"UPDATE candidates SET {cols}, updated_at=? WHERE id=?",
                (*fields.values(), _now(), cand_id),
            )

    # ------------------------------------------------------------------ run data

    def add_metrics(self, cand_id: int, metrics: list[tuple[str, float, int, int | None]]) -> None:
        """Metric rows (name, value, tracked_at ms, step): every logged value is kept."""
        now = _now()
        with self.tx() as db:
            db.executemany(
                "INSERT INTO candidate_metrics(candidate_id, name, value, tracked_at, step,"
                " created_at) VALUES (?,?,?,?,?,?)",
                [(cand_id, n, v, t, st, now) for n, v, t, st in metrics],
            )

    def add_params(
        self, cand_id: int, params: list[tuple[str, str]], *, skip_duplicates: bool
    ) -> None:
        """A param is logged once per run (unique name): a second one is ConflictError, or
        skipped with `skip_duplicates` (`insert_all`, as log-batch does)."""
        now = _now()
        verb = "INSERT OR IGNORE" if skip_duplicates else "INSERT"
        try:
            with self.tx() as db:
                db.executemany(
                    f"{verb} INTO candidate_params(candidate_id, name, value, created_at)"
                    " VALUES (?,?,?,?)",
                    [(cand_id, n, v, now) for n, v in params],
                )
        except sqlite3.IntegrityError:
            raise ConflictError("duplicate key value violates unique constraint") from None

    def add_tags(self, cand_id: int, tags: list[tuple[str, str]], *, skip_duplicates: bool) -> None:
        """Run tags (GitLab's candidate metadata): one value per name, like params."""
        with self.tx() as db:
            row = db.execute("SELECT tags FROM candidates WHERE id=?", (cand_id,)).fetchone()
            have = json.loads(row[0]) if row else []
            names = {t["key"] for t in have}
            for n, v in tags:
                if n in names:
                    if skip_duplicates:
                        continue
                    raise ConflictError(f"Validation failed: Name '{n}' already taken")
                names.add(n)
                have.append({"key": n, "value": v})
            db.execute(
                "UPDATE candidates SET tags=?, updated_at=? WHERE id=?",
                (json.dumps(have), _now(), cand_id),
            )

    def metrics(self, cand_id: int) -> list[Row]:
        return self.all(
            "SELECT * FROM candidate_metrics WHERE candidate_id=? ORDER BY id", (cand_id,)
        )

    def latest_metrics(self, cand_id: int) -> list[Row]:
        """Each metric's newest row (`Ml::CandidateMetric.latest`: the last logged)."""
        return self.all(
            "SELECT * FROM candidate_metrics WHERE id IN (SELECT MAX(id) FROM candidate_metrics"
            " WHERE candidate_id=? GROUP BY name) ORDER BY name",
            (cand_id,),
        )

    def params(self, cand_id: int) -> list[Row]:
        return self.all(
            "SELECT * FROM candidate_params WHERE candidate_id=? ORDER BY id", (cand_id,)
        )

    def delete_candidate(self, cand_id: int) -> None:
        """`Ml::DestroyCandidateService`: the run and what it logged; its package stays."""
        with self.tx() as db:
            for table in ("candidate_metrics", "candidate_params"):
                db.execute(f"DELETE FROM {table} WHERE candidate_id=?", (cand_id,))
            db.execute("DELETE FROM candidates WHERE id=?", (cand_id,))

    def delete_experiment(self, exp_id: int) -> None:
        """`Ml::DestroyExperimentService`; refused for a model's experiment (StoreError)."""
        exp = self.one("SELECT * FROM experiments WHERE id=?", (exp_id,))
        if exp is None:
            raise NotFoundError("experiment not found")
        if exp["model_id"] is not None:
            raise StoreError("Cannot delete an experiment associated to a model")
        for c in self.all("SELECT id FROM candidates WHERE experiment_id=?", (exp_id,)):
            self.delete_candidate(int(c["id"]))
        with self.tx() as db:
            db.execute("DELETE FROM experiments WHERE id=?", (exp_id,))

    def set_experiment_tag(self, exp_id: int, key: str, value: str) -> None:
        """`experiment.metadata.create!`: one value per name (ConflictError)."""
        with self.tx() as db:
            row = db.execute("SELECT tags FROM experiments WHERE id=?", (exp_id,)).fetchone()
            tags = json.loads(row[0]) if row else []
            if any(t["key"] == key for t in tags):
                raise ConflictError(f"Validation failed: Name '{key}' already taken")
            tags.append({"key": key, "value": value})
            db.execute("UPDATE experiments SET tags=? WHERE id=?", (json.dumps(tags), exp_id))

    # ------------------------------------------------------------------ packages

    @staticmethod
    def _find_or_create_package(db: sqlite3.Connection, pid: int, name: str, version: str) -> int:
        row = db.execute(
            "SELECT id FROM packages WHERE project_id=? AND name=? AND version=? AND"
            " package_type='ml_model' AND status != 'pending_destruction' ORDER BY id LIMIT 1",
            (pid, name, version),
        ).fetchone()
        if row:
            return int(row[0])
        now = _now()
        cur = db.execute(
            "INSERT INTO packages(project_id, name, version, created_at, updated_at)"
            " VALUES(?,?,?,?,?)",
            (pid, name, version, now, now),
        )
        return int(cur.lastrowid or 0)

    def package(self, package_id: int) -> Row | None:
        return self.one("SELECT * FROM packages WHERE id=?", (package_id,))

    def owner_package(self, project_id: int, owner: str | int, *, create: bool = True) -> Row:
        """The package of a `:model_version_id` route value (version id or `candidate:<iid>`).

        Raises NotFoundError for a missing version or candidate. A candidate's package is
        created on first use, even by a read, as GitLab's PackageForCandidateService does.
        """
        owner = str(owner)
        link_version: int | None = None
        if owner.startswith(CANDIDATE_PREFIX):
            iid = ar_integer(owner[len(CANDIDATE_PREFIX) :])
            cand = self.candidate(project_id, iid=iid) if iid is not None else None
            if cand is None:
                raise NotFoundError(f"candidate {owner} not found")
            if cand["model_version_id"] is not None:
                v = self.version(project_id, cand["model_version_id"])
                if v is not None and v["package_id"] is not None:
                    pkg = self.package(v["package_id"])
                    if pkg is not None:
                        return pkg
            name, version = self.candidate_package_name(cand), f"candidate_{cand['iid']}"
        else:
            vid = ar_integer(owner)
            v = self.version(project_id, vid) if vid is not None else None
            if v is None:
                raise NotFoundError(f"model version {owner} not found")
            if v["package_id"] is not None:
                pkg = self.package(v["package_id"])
                if pkg is not None and pkg["status"] != "pending_destruction":
                    return pkg
            name, version, link_version = v["model_name"], v["version"], v["id"]
        with self.tx() as db:
            package_id = self._find_or_create_package(db, project_id, name, version)
            if link_version is not None:
                db.execute(
                    "UPDATE model_versions SET package_id=? WHERE id=?", (package_id, link_version)
                )
        pkg = self.package(package_id)
        assert pkg is not None
        return pkg

    def set_package_status(self, package_id: int, status: str) -> None:
        with self.tx() as db:
            db.execute(
                "UPDATE packages SET status=?, updated_at=? WHERE id=?",
                (status, _now(), package_id),
            )

    def touch_downloaded(self, package_id: int) -> None:
        with contextlib.suppress(sqlite3.OperationalError):  # a busy DB must not fail a download
            with self.tx() as db:
                db.execute(
                    "UPDATE packages SET last_downloaded_at=? WHERE id=?", (_now(), package_id)
                )

    def _destroy_package(self, db: sqlite3.Connection, package_id: int) -> None:
        db.execute(
            "UPDATE packages SET status='pending_destruction', updated_at=? WHERE id=?",
            (_now(), package_id),
        )
        for (fid,) in db.execute(
            "SELECT id FROM package_files WHERE package_id=? AND status!='pending_destruction'",
            (package_id,),
        ).fetchall():
            self._destroy_file(db, fid)

    def destroy_package(self, package_id: int) -> None:
        with self.tx() as db:
            self._destroy_package(db, package_id)
            db.execute(
                "UPDATE model_versions SET package_id=NULL WHERE package_id=?", (package_id,)
            )

    # ------------------------------------------------------------------ files

    def stage(self, data: bytes | BinaryIO | os.PathLike[str] | Staged) -> Staged:
        """Copy `data` into the staging area, hashing as it goes (never all in memory)."""
        if isinstance(data, Staged):
            return data
        w = StagingFile(self.tmp_dir)
        try:
            if isinstance(data, bytes | bytearray | memoryview):
                src: BinaryIO = io.BytesIO(bytes(data))
                close = False
            elif isinstance(data, os.PathLike):
                src, close = open(data, "rb"), True
            else:
                src, close = data, False
            try:
                while chunk := src.read(CHUNK):
                    w.write(chunk)
            finally:
                if close:
                    src.close()
            return w.finish()
        except BaseException:
            w.abort()
            raise

    def new_staging_file(self) -> StagingFile:
        return StagingFile(self.tmp_dir)

    def add_file(
        self,
        project: ProjectRef,
        owner: int | str,
        path: str,
        data: bytes | BinaryIO | os.PathLike[str] | Staged,
        *,
        status: str | None = None,
    ) -> int:
        """Add a package file to a model version (id) or `"candidate:<iid>"`; returns its id.

        `path` is the decoded relative path ("dir/model.bin"); it is stored encoded like
        GitLab does (`dir%2Fmodel.bin`). A second upload of the same path adds another row.
        `status` ("default"/"hidden") sets the status of the whole package, as `?status=` does.
        """
        name = path.rsplit("/", 1)[-1]
        if not valid_file_name(name) or name in (".", ".."):
            data.discard() if isinstance(data, Staged) else None
            raise InvalidError(f"invalid file name {name!r}: only A-Z a-z 0-9 . _ - + and space")
        if status not in (None, "default", "hidden"):
            raise InvalidError("status must be default or hidden")
        staged = self.stage(data)
        try:
            pid = self._project_id(project)
            pkg = self.owner_package(pid, owner, create=True)
            now = _now()
            with self.tx() as db:
                if status is not None and status != pkg["status"]:
                    db.execute(
                        "UPDATE packages SET status=?, updated_at=? WHERE id=?",
                        (status, now, pkg["id"]),
                    )
                cur = db.execute(
                    "INSERT INTO package_files(package_id, file_name, size, file_sha256,"
                    " created_at,"
                    " updated_at) VALUES(?,?,?,?,?,?)",
                    (pkg["id"], encode_uri_component(path), staged.size, staged.sha256, now, now),
                )
                file_id = int(cur.lastrowid or 0)
                rel = f"blobs/{pid}/{pkg['id']}/{file_id}"
                final = self.data_dir / rel
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged.tmp, final)
                db.execute("UPDATE package_files SET blob=? WHERE id=?", (rel, file_id))
                db.execute("UPDATE packages SET updated_at=? WHERE id=?", (now, pkg["id"]))
            return file_id
        finally:
            staged.discard()  # no-op once renamed

    def blob_path(self, file_row: Row) -> Path:
        return self.data_dir / file_row["blob"]

    def newest_file(self, package_id: int, encoded_name: str) -> Row | None:
        """What the ml_models GET serves: the installable row with that name and highest id."""
        return self.one(
            "SELECT * FROM package_files WHERE package_id=? AND file_name=? AND status='default'"
            " ORDER BY id DESC LIMIT 1",
            (package_id, encoded_name),
        )

    def files(self, package_id: int) -> list[Row]:
        return self.all(
            "SELECT * FROM package_files WHERE package_id=? AND status='default' ORDER BY id",
            (package_id,),
        )

    def file(self, package_id: int, file_id: int) -> Row | None:
        return self.one(
            "SELECT * FROM package_files WHERE package_id=? AND id=? AND status='default'",
            (package_id, file_id),
        )

    def _destroy_file(self, db: sqlite3.Connection, file_id: int) -> None:
        row = db.execute("SELECT blob FROM package_files WHERE id=?", (file_id,)).fetchone()
        db.execute(
            "UPDATE package_files SET status='pending_destruction', updated_at=? WHERE id=?",
            (_now(), file_id),
        )
        # GitLab purges asynchronously; we purge at once (nothing can observe the difference)
        if row and row[0]:
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / row[0]).unlink()

    def destroy_file(self, file_id: int) -> None:
        with self.tx() as db:
            self._destroy_file(db, file_id)

    # ------------------------------------------------------------------ misc

    def signing_key(self) -> bytes:
        """HMAC key for redirect-mode URLs; persisted so URLs survive a restart."""
        path = self.data_dir / "signing.key"
        try:
            return bytes.fromhex(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            key = secrets.token_bytes(32)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(key.hex())
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, path)  # first writer wins if two processes race
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            return bytes.fromhex(path.read_text().strip())

    def summary(self, project: ProjectRef) -> str:
        """Human-readable listing of a project's models, versions, candidates and files."""
        p = self.project(project)
        if p is None:
            raise NotFoundError(f"project {project!r} not found")
        lines = [f"project {p['path']} (id {p['id']}, {p['visibility']})"]
        for m in self.all("SELECT * FROM models WHERE project_id=? ORDER BY name", (p["id"],)):
            lines.append(f"  model {m['name']} (id {m['id']})")
            for v in self.versions(m["id"]):
                pkg = self.package(v["package_id"]) if v["package_id"] else None
                files = self.files(pkg["id"]) if pkg else []
                status = f", package {pkg['id']} {pkg['status']}" if pkg else ""
                lines.append(
                    f"    version {v['version']} (id {v['id']}{status}, {len(files)} files)"
                )
                for f in files:
                    lines.append(f"      {f['file_name']}  {f['size']} bytes  (file {f['id']})")
        for c in self.all(
            "SELECT * FROM candidates WHERE project_id=? AND model_version_id IS NULL ORDER BY iid",
            (p["id"],),
        ):
            pkg = self.one(
                "SELECT * FROM packages WHERE project_id=? AND version=? AND"
                " status!='pending_destruction'",
                (p["id"], f"candidate_{c['iid']}"),
            )
            files = self.files(pkg["id"]) if pkg else []
            lines.append(f"  candidate {c['iid']} (run {c['eid']}, {len(files)} files)")
            for f in files:
                lines.append(f"      {f['file_name']}  {f['size']} bytes  (file {f['id']})")
        return "\n".join(lines)
