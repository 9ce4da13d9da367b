"""Run the command-line interface with ``python -m dinodpmm``."""

from .experiments.cli import main

raise SystemExit(main())
