"""Embedded GitLab-compatible ML model registry (`mlregfs serve`): SQLite + blob directory.

Modules: app (ASGI entry), routing (route table, Grape's matching), http (errors, settings,
counting middleware), auth (tokens, scopes, access levels), context (one request), api/ (one
module per API area), store/ (all state and all SQL), serving (Range/streaming), storage
(redirect mode's signed URLs), validation (GitLab's name rules), cli (serve/admin), demo
(sample data), testing (ServerProcess harness).
"""
