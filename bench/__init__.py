"""The mlregfs benchmark (run bench/run.py)."""
