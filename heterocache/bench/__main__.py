"""``python -m heterocache.bench ARGS`` = ``heterocache bench ARGS``."""

from heterocache.bench.cli import main

raise SystemExit(main())
