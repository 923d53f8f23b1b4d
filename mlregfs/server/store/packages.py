"""Packages and their files: rows, blobs on disk, staging of uploads."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sqlite3
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mlregfs.server.store.base import Row, StoreBase, _now

CHUNK = 1 << 20


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


# the packages API's order_by values and their columns (never a caller's string in SQL)
_PACKAGE_ORDER = {
    "created_at": "created_at",
    "name": "name",
    "version": "version",
    "type": "package_type",
}
_FILE_ORDER = ("id", "created_at", "file_name")


class PackageStore(StoreBase):
    """Packages and package files (GitLab's packages tables and object storage)."""

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

    def packages(
        self,
        project_id: int,
        *,
        statuses: Sequence[str],
        package_type: str | None = None,
        name_like: str | None = None,
        version: str | None = None,
        order_by: str = "created_at",
        descending: bool = False,
    ) -> list[Row]:
        """The packages API's listing (`order_by`: created_at, name, version or type).

        `name_like` matches as GitLab's search_by_name: ILIKE %name% (fuzzy, case-insensitive).
        """
        sql = "SELECT * FROM packages WHERE project_id=?"
        args: list[Any] = [project_id]
        if package_type:
            sql += " AND package_type=?"
            args.append(package_type)
        if name_like:
            esc = name_like.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            sql += " AND name LIKE ? ESCAPE '\\'"
            args.append(f"%{esc}%")
        if version:
            sql += " AND version=?"
            args.append(version)
        sql += f" AND status IN ({','.join('?' * len(statuses))})"
        args.extend(statuses)
        col = _PACKAGE_ORDER[order_by]
        direction = "DESC" if descending else "ASC"
        sql += f" ORDER BY {col} {direction}, id {direction}"
        return self.all(sql, tuple(args))

    def package_versions(self, pkg: Row, statuses: Sequence[str]) -> list[Row]:
        """The other packages of that name and type in its project (the entity's `versions`)."""
        marks = ",".join("?" * len(statuses))
        return self.all(
            f"SELECT * FROM packages WHERE project_id=? AND name=? AND package_type=? AND id!=?"
            f" AND status IN ({marks}) ORDER BY id",
            (pkg["project_id"], pkg["name"], pkg["package_type"], pkg["id"], *statuses),
        )

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

    def blob_path(self, file_row: Row) -> Path:
        return self.data_dir / file_row["blob"]

    def newest_file(self, package_id: int, encoded_name: str) -> Row | None:
        """What the ml_models GET serves: the installable row with that name and highest id."""
        return self.one(
            "SELECT * FROM package_files WHERE package_id=? AND file_name=? AND status='default'"
            " ORDER BY id DESC LIMIT 1",
            (package_id, encoded_name),
        )

    def files(
        self, package_id: int, *, order_by: str = "id", descending: bool = False
    ) -> list[Row]:
        """A package's installable files (`order_by`: id, created_at or file_name)."""
        if order_by not in _FILE_ORDER:
            raise ValueError(f"cannot order package files by {order_by!r}")
        direction = "DESC" if descending else "ASC"
        return self.all(
            "SELECT * FROM package_files WHERE package_id=? AND status='default'"
            f" ORDER BY {order_by} {direction}, id {direction}",
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
