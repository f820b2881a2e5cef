"""`python -m autoresearch_kit ...`: the same as the `autoresearch` command (see cli.py)."""

from autoresearch_kit.cli import main

raise SystemExit(main())
