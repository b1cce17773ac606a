from fdistill.cli import main

raise SystemExit(main())
