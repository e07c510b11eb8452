"""Loaded with ``-p tests.environment`` (pyproject addopts) before pytest-django sets Django up.

The suite keeps its embedded servers in their own DATA_DIR so that running the tests never
touches the database, broker or workspaces of a ``make run`` on the same checkout.
"""

import os
from pathlib import Path

os.environ.setdefault("DATA_DIR", str(Path(__file__).resolve().parent.parent / ".data" / "test"))
# Most tests exercise builds whose agents never reach a control plane; waiting for them to report
# ready is covered by its own tests (tests/workspaces/test_agent_wait.py), which turn it back on.
os.environ.setdefault("PROVISIONER_AGENT_READY_TIMEOUT", "0")
# Every test client comes from 127.0.0.1, so the failed-credential limits (accounts.ratelimit)
# would carry failures from test to test, and between runs sharing the embedded Redis. Off for
# the suite; tests/security/test_ratelimit.py turns them on with a random address per test.
os.environ.setdefault("RATELIMIT_LOGIN_FAILURES", "0")
os.environ.setdefault("RATELIMIT_TOKEN_FAILURES", "0")
os.environ.setdefault("RATELIMIT_LOGIN_USER_FAILURES", "0")
os.environ.setdefault("RATELIMIT_MALFORMED_FAILURES", "0")
