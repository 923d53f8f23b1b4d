"""Semantic core: the POSIX meaning of the registry. No pyfuse3 import here."""
