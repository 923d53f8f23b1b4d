"""`python -m mlregfs` runs the command line."""

from mlregfs.cli import main

raise SystemExit(main())
