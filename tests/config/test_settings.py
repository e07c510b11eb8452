"""Bad environment values stop start-up with a message naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _start(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env.update(DATA_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="config.settings", **variables)
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "0"),
        ("PORT", "70000"),
        ("DEBUG", "perhaps"),
        ("PREBUILDS_RECONCILIATION_INTERVAL", "-1"),
        ("PREBUILDS_RECONCILIATION_INTERVAL", "soon"),
        ("PREBUILDS_BACKOFF_INTERVAL", "-5"),
        ("PREBUILDS_BACKOFF_LOOKBACK", "an hour"),
        ("PREBUILDS_FAILURE_HARD_LIMIT", "-1"),
        ("PREBUILDS_FAILURE_HARD_LIMIT", "3.5"),
        ("PREBUILDS_MAX_INSTANCES_PER_PRESET", "-1"),
        ("PREBUILDS_MAX_INSTANCES_PER_PRESET", "many"),
        ("PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION", "-5"),
        ("PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION", "99999999999"),
        ("ACCESS_URL", "ftp://example.com"),
        ("ACCESS_URL", "localhost:8000"),
        ("DATABASE_URL", "mysql://root@localhost/db"),
        ("CELERY_BROKER_URL", "not a url"),
        ("AGENT_DISCONNECT_TIMEOUT", "half a minute"),
        ("AGENT_DISCONNECT_TIMEOUT", "0"),
    ],
)
def test_it_refuses_a_bad_value_naming_the_variable(tmp_path, name, value):
    result = _start(tmp_path, **{name: value})

    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "ImproperlyConfigured" in last_line
    assert f"{name}:" in last_line
    # Nothing was started: validation happens before the embedded services.
    assert not (tmp_path / "postgres").exists()


def test_it_starts_with_good_values(tmp_path):
    result = _start(
        tmp_path,
        PORT="8123",
        DEBUG="true",
        PREBUILDS_FAILURE_HARD_LIMIT="0",
        PREBUILDS_MAX_INSTANCES_PER_PRESET="0",
        PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION="100000",
        DATABASE_URL="postgres://nobody@127.0.0.1:1/none",
        CELERY_BROKER_URL="redis://127.0.0.1:1/0",
    )

    assert result.returncode == 0, result.stderr


def _command(tmp_path: Path, *command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env.update(DATA_DIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "command", [("manage.py", "check"), ("-m", "config.launcher")], ids=["manage.py", "make run"]
)
def test_a_data_dir_that_cannot_be_created_stops_start_up_with_one_line_naming_it(
    tmp_path, command
):
    occupied = tmp_path / "a-file"
    occupied.write_text("")
    data_dir = occupied / "data"  # cannot be created: its parent is a file

    result = _command(data_dir, *command)

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DATA_DIR:" in lines[0]
    assert str(data_dir) in lines[0]
    assert "Traceback" not in result.stderr
