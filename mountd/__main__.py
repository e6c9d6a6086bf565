"""`python -m mountd` runs the command line."""

from mountd.cli import main

raise SystemExit(main())
