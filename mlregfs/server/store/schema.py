"""The database's schema (DDL) and the first id of each table's sequence.

Id sequences start at different offsets so that an id of one kind never happens to be a
valid id of another (a client mixing up a model-version id and a package id gets a 404).
"""

# first id handed out per table (sqlite_sequence holds "last used", hence the -1)
ID_OFFSETS = {
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


SCHEMA = """
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
