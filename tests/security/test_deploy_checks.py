"""``manage.py check --deploy`` is clean with a production-like environment (DEBUG off, HTTPS).

Run in a subprocess because settings are read once per process. ``DATABASE_URL`` and
``CELERY_BROKER_URL`` point at external services that do not exist, so nothing embedded starts
(``check`` needs neither a database nor a broker).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PRODUCTION = {
    "DEBUG": "false",
    "ALLOWED_HOSTS": "warmstart.example.com",
    "ACCESS_URL": "https://warmstart.example.com",
    "DATABASE_URL": "postgres://warmstart:secret@db.invalid:5432/warmstart",
    "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
}


def _run(tmp_path: Path, code: list[str], **variables: str) -> subprocess.CompletedProcess:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SECURE_", "RATELIMIT_", "DJANGO_"))
        and name not in ("DATABASE_URL", "CELERY_BROKER_URL", "SECRET_KEY")
    }
    env.update(
        DATA_DIR=str(tmp_path),
        SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_SETTINGS_MODULE="config.settings",
        **PRODUCTION,
    )
    env.update(variables)
    return subprocess.run(
        [sys.executable, *code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _check(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    return _run(
        tmp_path, ["manage.py", "check", "--deploy", "--fail-level", "WARNING"], **variables
    )


def _setting(tmp_path: Path, name: str, **variables: str) -> str:
    code = (
        "import django; django.setup(); from django.conf import settings; "
        f"print(repr(settings.{name}))"
    )
    result = _run(tmp_path, ["-c", code], **variables)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_it_is_clean_with_a_production_environment(tmp_path):
    result = _check(tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout
    # Nothing embedded was started: external services only.
    assert not (tmp_path / "postgres").exists()
    assert not (tmp_path / "redis.db").exists()


def test_it_warns_when_production_runs_on_plain_http(tmp_path):
    result = _check(tmp_path, ACCESS_URL="http://warmstart.example.com")

    assert result.returncode != 0
    for check in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert check in result.stderr + result.stdout


def test_it_warns_about_a_weak_secret_key(tmp_path):
    result = _check(tmp_path, SECRET_KEY="short")

    assert result.returncode != 0
    assert "security.W009" in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("name", "variables", "expected"),
    [
        ("SECURE_HSTS_SECONDS", {}, "31536000"),
        ("SECURE_HSTS_SECONDS", {"SECURE_HSTS_SECONDS": "600"}, "600"),
        ("SECURE_SSL_REDIRECT", {}, "True"),
        ("SESSION_COOKIE_SECURE", {}, "True"),
        ("CSRF_COOKIE_SECURE", {}, "True"),
        ("SECURE_PROXY_SSL_HEADER", {}, "None"),
        (
            "SECURE_PROXY_SSL_HEADER",
            {"SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto"},
            "('HTTP_X_FORWARDED_PROTO', 'https')",
        ),
        ("SECURE_SSL_REDIRECT", {"ACCESS_URL": "http://127.0.0.1:8000"}, "False"),
        ("SECURE_HSTS_SECONDS", {"ACCESS_URL": "http://127.0.0.1:8000"}, "0"),
        (
            "CACHES['default']['BACKEND']",
            {},
            "'config.cache.RedisCache'",
        ),
    ],
)
def test_the_security_settings_follow_the_environment(tmp_path, name, variables, expected):
    assert _setting(tmp_path, name, **variables) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RATELIMIT_LOGIN_FAILURES", "-1"),
        ("RATELIMIT_TOKEN_FAILURES", "many"),
        ("RATELIMIT_LOGIN_USER_FAILURES", "-5"),
        ("RATELIMIT_MALFORMED_FAILURES", "lots"),
        ("RATELIMIT_WINDOW", "0"),
        ("SECURE_HSTS_SECONDS", "a year"),
        ("SECURE_SSL_REDIRECT", "perhaps"),
    ],
)
def test_it_refuses_a_bad_value_naming_the_variable(tmp_path, name, value):
    result = _run(tmp_path, ["-c", "import django; django.setup()"], **{name: value})

    assert result.returncode != 0
    assert f"{name}:" in result.stderr.strip().splitlines()[-1]
