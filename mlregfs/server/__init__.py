"""Embedded GitLab-compatible ML model registry (`mlregfs serve`): SQLite + blob directory.

Modules: store (state), app (the /api/v4 subset), serving (Range/streaming), storage (redirect
mode's signed URLs), cli (serve/admin), demo (sample data), testing (ServerProcess harness).
"""
