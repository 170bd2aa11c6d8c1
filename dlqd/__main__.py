from dlqd.cli import main

raise SystemExit(main())
