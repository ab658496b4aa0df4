from theychat.daemons.cli import main

raise SystemExit(main())
