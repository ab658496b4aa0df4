from daemons.cli import main

raise SystemExit(main())
