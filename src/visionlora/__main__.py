from visionlora.cli import main

raise SystemExit(main())
