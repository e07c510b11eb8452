"""``python -m workspaces.agent --url ACCESS_URL [--token-file PATH] [--log-level LEVEL]``."""

from .agent import main

raise SystemExit(main())
