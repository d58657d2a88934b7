from heterocache.cli import main

raise SystemExit(main())
