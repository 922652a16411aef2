"""`python -m model_build ...`: see model_build/cli.py."""

from model_build.cli import main

raise SystemExit(main())
