"""The store as the server uses it: models and versions over runs and packages."""

from __future__ import annotations

import json
import os
import secrets
from typing import BinaryIO

from mlregfs.server.store.base import (
    CANDIDATE_PREFIX,
    MODEL_EXPERIMENT_PREFIX,
    ProjectRef,
    Row,
    _now,
)
from mlregfs.server.store.errors import ConflictError, InvalidError, NotFoundError
from mlregfs.server.store.packages import Staged
from mlregfs.server.store.runs import RunStore
from mlregfs.server.validation import (
    MODEL_NAME_RULE,
    SEMVER_RULE,
    ar_integer,
    encode_uri_component,
    parse_semver,
    valid_file_name,
    valid_model_name,
)

_VERSION_SELECT = (
    "SELECT v.*, m.name AS model_name FROM model_versions v JOIN models m ON m.id=v.model_id"
)


class Store(RunStore):
    """SQLite + blob store. One connection per thread; every write is one short transaction."""

    # ------------------------------------------------------------------ models and versions

    def model(self, project_id: int, name: str) -> Row | None:
        return self.one("SELECT * FROM models WHERE project_id=? AND name=?", (project_id, name))

    def model_by_id(self, model_id: int) -> Row | None:
        return self.one("SELECT * FROM models WHERE id=?", (model_id,))

    def models(self, project_id: int) -> list[Row]:
        return self.all("SELECT * FROM models WHERE project_id=? ORDER BY name", (project_id,))

    def set_model_description(self, model_id: int, description: str) -> None:
        self._set_description("models", model_id, description)

    def _set_description(self, table: str, row_id: int, description: str) -> None:
        with self.tx() as db:
            db.execute(
                f"UPDATE {table} SET description=?, updated_at=? WHERE id=?",
                (description, _now(), row_id),
            )

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
            self._insert_candidate(
                db, pid, experiment_id=exp_id, model_version_id=version_id, user_id=user_id
            )
            db.execute("UPDATE models SET updated_at=? WHERE id=?", (now, m["id"]))
            return version_id

    def version(self, project_id: int, version_id: int) -> Row | None:
        return self.one(
            _VERSION_SELECT + " WHERE v.project_id=? AND v.id=?",
            (project_id, version_id),
        )

    def version_by_id(self, version_id: int) -> Row | None:
        """A version row in whichever project (GraphQL's global ids)."""
        return self.one("SELECT * FROM model_versions WHERE id=?", (version_id,))

    def set_version_description(self, version_id: int, description: str) -> None:
        self._set_description("model_versions", version_id, description)

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
                self._delete_candidates(db, "experiment_id", e)
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
            self._delete_candidates(db, "model_version_id", version_id)
            db.execute("DELETE FROM model_versions WHERE id=?", (version_id,))

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
        for m in self.models(int(p["id"])):
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
