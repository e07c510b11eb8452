"""pgserver stops the embedded PostgreSQL when its last listed user exits; a user killed
without exiting (SIGKILL, a killed test run) must not keep it running for every later run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from config import embedded


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_dead_users_are_forgotten_and_live_ones_kept(tmp_path):
    dead = _dead_pid()
    listed = tmp_path / ".handle_pids.json"
    listed.write_text(json.dumps([dead, os.getpid()]))

    embedded._forget_dead_postgres_users(tmp_path)

    assert json.loads(listed.read_text()) == [os.getpid()]


def test_no_list_yet_is_left_alone(tmp_path):
    embedded._forget_dead_postgres_users(tmp_path)

    assert not (tmp_path / ".handle_pids.json").exists()
