"""Reading settings from the environment in one place, failing loudly on bad values.

Every variable of DESIGN.md §3 is read here. A bad value raises ``ImproperlyConfigured`` whose
message starts with the variable's name, so start-up stops with something an operator can act on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from django.core.exceptions import ImproperlyConfigured
from environs import Env, EnvError
from marshmallow.validate import Range

_env = Env()


def _read(parser: Callable[..., Any], name: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return parser(name, *args, **kwargs)
    except EnvError as exc:
        raise ImproperlyConfigured(
            f"{name}: invalid value {os.environ.get(name)!r} ({exc})"
        ) from None


def data_dir(value: str, base: Path) -> Path:
    """``DATA_DIR`` made absolute, created, and checked writable; a problem stops start-up with
    one line naming ``DATA_DIR`` (not an ``OSError`` traceback from whatever wrote first)."""
    path = Path(value)
    if not path.is_absolute():
        path = base / path
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ImproperlyConfigured(
            f"DATA_DIR: {str(path)!r} is not a writable directory ({reason}); "
            "set DATA_DIR to a directory Warmstart may create and write"
        ) from None
    return path


def str_(name: str, default: str) -> str:
    return _read(_env.str, name, default)


def bool_(name: str, default: bool) -> bool:
    return _read(_env.bool, name, default)


def int_(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None):
    return _read(_env.int, name, default, validate=Range(min=minimum, max=maximum))


def float_(name: str, default: float, *, minimum: float | None = None) -> float:
    return _read(_env.float, name, default, validate=Range(min=minimum))


def list_(name: str, default: list[str]) -> list[str]:
    return [item.strip() for item in _read(_env.list, name, default) if item.strip()]


def url(name: str, default: str, *, schemes: set[str]) -> str:
    value = _read(_env.str, name, default)
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in schemes or not rest:
        allowed = ", ".join(sorted(schemes))
        raise ImproperlyConfigured(
            f"{name}: invalid value {value!r} (expected a URL with scheme one of: {allowed})"
        )
    return value


# Executions of a statement on one connection before psycopg prepares it (psycopg's default).
PREPARE_THRESHOLD = 5
# Seconds a request waits for a pooled connection; a connect's own limit; and how long the pool
# keeps retrying one connection attempt (see ``database``).
POOL_TIMEOUT = 3.0
CONNECT_TIMEOUT = 3
POOL_RECONNECT_TIMEOUT = 2.0


def database(name: str, url_value: str, *, pool_size: int = 10) -> dict[str, Any]:
    """Parse a database URL into Django's DATABASES entry, naming ``name`` on failure."""
    import dj_database_url

    try:
        config = dj_database_url.parse(url_value)
    except Exception as exc:  # dj-database-url raises several kinds
        raise ImproperlyConfigured(f"{name}: invalid value ({exc})") from None
    if config.get("ENGINE") != "django.db.backends.postgresql":
        raise ImproperlyConfigured(f"{name}: Warmstart needs PostgreSQL (postgres:// URL)")
    # A connection pool per process (psycopg_pool), not persistent per-thread connections: a
    # web process runs requests on a pool of threads (config.asgi) and the agents' reinit reads
    # on another, a worker runs jobs on threads of its own; the pool hands a warm connection to
    # whichever thread asks and takes it back when Django closes it at the end of a request, so
    # a process never holds more than DATABASE_POOL_SIZE connections.
    config["CONN_MAX_AGE"] = 0
    # Check a pooled connection before handing it out, so a database restart costs a reconnect,
    # not a failed request or task (the pool only checks when Django asks it to).
    config["CONN_HEALTH_CHECKS"] = True
    options = config.setdefault("OPTIONS", {})
    # During a database outage a request waits at most `timeout` for a connection before it is
    # answered 503 (config.outage), and the pool retries connecting at most ~1 s apart: psycopg's
    # reconnect back-off otherwise doubles up to a minute, which kept the web failing for ~35 s
    # after the database was back. Giving up after `reconnect_timeout` resets that back-off; the
    # next request starts a fresh attempt at once.
    options["pool"] = {
        "min_size": 1,
        "max_size": pool_size,
        "timeout": POOL_TIMEOUT,
        "reconnect_timeout": POOL_RECONNECT_TIMEOUT,
    }
    # A server that does not answer (TCP to a lost host) fails a connect after this many seconds.
    options.setdefault("connect_timeout", CONNECT_TIMEOUT)
    # Server-side prepared statements (Django turns them off unless asked): a statement run a
    # few times on a pooled connection is planned once. Planning dominates our hot queries
    # (the claim's eligibility query: ~6.5 ms to plan, 0.3 ms to run). Pooled connections live
    # long, so the plans are reused across requests. (Behind PgBouncer in transaction mode this
    # needs PgBouncer >= 1.21 with max_prepared_statements set.)
    options.setdefault("prepare_threshold", PREPARE_THRESHOLD)
    return config


# Django-only keys of OPTIONS that are not libpq/psycopg connection parameters.
_DJANGO_ONLY_OPTIONS = ("pool", "isolation_level", "server_side_binding", "assume_role")


def database_url_of(settings_dict: dict[str, Any]) -> str:
    """A ``postgres://`` URL for a Django database entry (for child processes' DATABASE_URL).

    A unix-socket directory in HOST (the embedded server) is percent-encoded into the host part.
    """
    auth = quote(settings_dict.get("USER") or "", safe="")
    if settings_dict.get("PASSWORD"):
        auth += ":" + quote(settings_dict["PASSWORD"], safe="")
    host = settings_dict.get("HOST") or (settings_dict.get("OPTIONS") or {}).get("host", "")
    port = f":{settings_dict['PORT']}" if settings_dict.get("PORT") else ""
    return f"postgres://{auth}@{quote(str(host), safe='')}{port}/{settings_dict['NAME']}"


def psycopg_params_of(settings_dict: dict[str, Any]) -> dict[str, Any]:
    """``psycopg.connect`` keywords for a Django database entry (a connection outside Django)."""
    params: dict[str, Any] = {
        "dbname": settings_dict["NAME"],
        "user": settings_dict.get("USER") or None,
        "password": settings_dict.get("PASSWORD") or None,
        "host": settings_dict.get("HOST") or None,
        "port": settings_dict.get("PORT") or None,
    }
    for key, value in (settings_dict.get("OPTIONS") or {}).items():
        if key not in _DJANGO_ONLY_OPTIONS:
            params[key] = value
    return {key: value for key, value in params.items() if value is not None}


def redis_url_of_broker(broker_url: str) -> str | None:
    """A redis-py URL for a Celery broker URL (``redis+socket://`` → ``unix://``); None when the
    broker is not Redis (AMQP)."""
    scheme, _, rest = broker_url.partition("://")
    if scheme in ("redis", "rediss"):
        return broker_url
    if scheme == "redis+socket":
        return f"unix://{rest}"
    return None
