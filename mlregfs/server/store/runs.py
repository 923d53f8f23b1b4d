"""Candidates (MLflow runs) and what they logged: metrics, params, tags; experiments."""

from __future__ import annotations

import json
import sqlite3
import uuid
from typing import Any

from mlregfs.server.store.base import MODEL_EXPERIMENT_PREFIX, ProjectRef, Row, _now
from mlregfs.server.store.errors import ConflictError, InvalidError, NotFoundError, StoreError
from mlregfs.server.store.packages import PackageStore


class RunStore(PackageStore):
    """Experiments, candidates, their run data."""

    def _insert_numbered(
        self, db: sqlite3.Connection, table: str, usage: str, pid: int, cols: Row
    ) -> Row:
        """Insert a row numbered within its project (`iid`, from the `usage` sequence) and
        stamped now; returns the row."""
        now = _now()
        row = {"project_id": pid, "iid": self._next_iid(db, pid, usage), **cols}
        row.update(created_at=now, updated_at=now)
        cur = db.execute(
            f"INSERT INTO {table}({', '.join(row)}) VALUES({','.join('?' * len(row))})",
            tuple(row.values()),
        )
        return dict(db.execute(f"SELECT * FROM {table} WHERE id=?", (cur.lastrowid,)).fetchone())

    def _insert_experiment(
        self,
        db: sqlite3.Connection,
        pid: int,
        name: str,
        *,
        tags: list[dict[str, str]] | None = None,
        model_id: int | None = None,
        user_id: int | None = None,
    ) -> Row:
        cols = {
            "name": name,
            "model_id": model_id,
            "user_id": user_id,
            "tags": json.dumps(tags or []),
        }
        return self._insert_numbered(db, "experiments", "ml_experiments", pid, cols)

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

    def experiments(self, project_id: int) -> list[Row]:
        return self.all("SELECT * FROM experiments WHERE project_id=? ORDER BY id", (project_id,))

    # ------------------------------------------------------------------ candidates

    def _insert_candidate(
        self,
        db: sqlite3.Connection,
        pid: int,
        *,
        experiment_id: int,
        model_version_id: int | None = None,
        name: str | None = None,
        start_time: int | None = None,
        user_id: int | None = None,
        tags: list[dict[str, str]] | None = None,
    ) -> Row:
        cols = {
            "eid": str(uuid.uuid4()),
            "experiment_id": experiment_id,
            "name": name,
            "status": "running",
            "start_time": start_time,
            "model_version_id": model_version_id,
            "user_id": user_id,
            "tags": json.dumps(tags or []),
        }
        row = self._insert_numbered(db, "candidates", "ml_candidates", pid, cols)
        db.execute(
            "UPDATE experiments SET updated_at=? WHERE id=?", (row["updated_at"], experiment_id)
        )
        return row

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
                db,
                pid,
                experiment_id=exp_id,
                name=name,
                start_time=start_time,
                user_id=user_id,
                tags=tags,
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

    def experiment_candidates(self, exp_id: int) -> list[Row]:
        return self.all("SELECT * FROM candidates WHERE experiment_id=? ORDER BY id", (exp_id,))

    def version_run_id(self, version_id: int) -> str | None:
        """The run id (eid) of a model version's hidden candidate, if it has one."""
        row = self.one("SELECT eid FROM candidates WHERE model_version_id=?", (version_id,))
        return str(row["eid"]) if row else None

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

    @staticmethod
    def _delete_candidates(db: sqlite3.Connection, column: str, value: int) -> None:
        """The candidates whose `column` (id, experiment_id, model_version_id) is `value`,
        with the metrics and params they logged."""
        for table in ("candidate_metrics", "candidate_params"):
            db.execute(
                f"DELETE FROM {table} WHERE candidate_id IN"
                f" (SELECT id FROM candidates WHERE {column}=?)",
                (value,),
            )
        db.execute(f"DELETE FROM candidates WHERE {column}=?", (value,))

    def delete_candidate(self, cand_id: int) -> None:
        """`Ml::DestroyCandidateService`: the run and what it logged; its package stays."""
        with self.tx() as db:
            self._delete_candidates(db, "id", cand_id)

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
