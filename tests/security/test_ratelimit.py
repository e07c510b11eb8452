"""Tokens are stored hashed; failed credentials are rate limited by what the client presented
(accounts.ratelimit): per key id for tokens, per (user name, address) and per user name for
sign-ins, per address only for malformed tokens and unknown key ids.

Every test uses its own random client address and fresh tokens, so concurrent test runs sharing
the embedded Redis never see each other's counters; counters are cleared afterwards.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import shutil
import threading
import time
from datetime import timedelta

import httpx
import pytest
import time_machine
from django.test import Client
from django.utils import timezone

from accounts import ratelimit, tokens
from accounts.models import ApiToken
from accounts.services import api_token_authenticate, api_token_create, api_token_revoke
from config.cache import RedisCache
from config.settings import _caches
from tests.accounts.factories import UserFactory
from tests.processes import asgi_server
from tests.workspaces.factories import AgentFactory
from workspaces.models import WorkspaceAgent
from workspaces.services import agent_authenticate

pytestmark = pytest.mark.django_db

LIMIT = 3
MALFORMED_LIMIT = 12  # "far larger" than LIMIT, and more than the ten bad tokens of the issue
USER_LIMIT = 7
PASSWORD = "correct horse battery staple"
MANIFEST = "/api/v2/workspaceagents/me/manifest"
LIFECYCLE = "/api/v2/workspaceagents/me/lifecycle"
REINIT = "/api/v2/workspaceagents/me/reinit?wait=0"
ME = "/api/v2/users/me"
# Well formed, but no token was ever issued under this key id.
BAD_API = "Bearer wst_0000000000000000_nope"
BAD_AGENT = "Bearer wsa_0000000000000000_nope"
USERS = ("alice", "bob")
# The reinit view reads the agent in a thread of its own: the agent must be committed.
SEEN = pytest.mark.django_db(transaction=True)


def _address() -> str:
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


def _scopes_of(address: str) -> list[ratelimit.Scope]:
    scopes = [ratelimit.address_scope(kind, address) for kind in ratelimit.KINDS]
    for username in USERS:
        scopes.extend(ratelimit.login_scopes(username, address))
    return scopes


@pytest.fixture
def address():
    """A random client address for this test; its counters are removed afterwards."""
    value = _address()
    yield value
    ratelimit.reset(*_scopes_of(value))


@pytest.fixture(autouse=True)
def limits(settings):
    settings.RATELIMIT_LOGIN_FAILURES = LIMIT
    settings.RATELIMIT_LOGIN_USER_FAILURES = USER_LIMIT
    settings.RATELIMIT_TOKEN_FAILURES = LIMIT
    settings.RATELIMIT_MALFORMED_FAILURES = MALFORMED_LIMIT
    settings.RATELIMIT_WINDOW = 300
    # The per-user-name counters are shared by every address: start and end each test clean.
    ratelimit.reset(*(ratelimit.login_scopes(username, "-")[1] for username in USERS))
    yield settings
    ratelimit.reset(*(ratelimit.login_scopes(username, "-")[1] for username in USERS))


@pytest.fixture
def client(address):
    return Client(REMOTE_ADDR=address, raise_request_exception=False)


def _fail(client: Client, url: str, header: str, times: int = LIMIT) -> list[int]:
    return [client.get(url, HTTP_AUTHORIZATION=header).status_code for _ in range(times)]


def _wrong_secret(token: str) -> str:
    """``Bearer`` + the token's prefix and key id with another secret: a guess at that token."""
    prefix, key_id, _ = token.split("_", 2)
    return f"Bearer {prefix}_{key_id}_{secrets.token_urlsafe(32)}"


def _bearer(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


# --- tokens at rest ---------------------------------------------------------------------------


def test_it_stores_api_and_agent_tokens_as_a_hash_of_the_secret_only():
    token = api_token_create(user=UserFactory())
    agent = AgentFactory()

    for plain, stored in (
        (token, ApiToken.objects.values_list("secret_hash", "key_id").get()),
        (
            agent.plain_token,
            WorkspaceAgent.objects.values_list("token_secret_hash", "token_key_id").get(),
        ),
    ):
        secret = plain.split("_", 2)[2]
        secret_hash, key_id = stored
        assert len(secret) == 43  # token_urlsafe(32): 32 random bytes
        assert secret_hash != secret and secret not in secret_hash and secret not in key_id
        assert secret_hash == tokens.hash_secret(secret)  # SHA-256 hex
        assert len(secret_hash) == 64


def test_it_compares_secrets_only_through_secret_matches_in_constant_time(monkeypatch):
    token = api_token_create(user=UserFactory())
    agent = AgentFactory()
    matches, digests = [], []
    real_matches, real_digest = tokens.secret_matches, hmac.compare_digest

    def spy_matches(secret, secret_hash):
        matches.append(secret)
        return real_matches(secret, secret_hash)

    def spy_digest(a, b):
        digests.append((a, b))
        return real_digest(a, b)

    monkeypatch.setattr(tokens, "secret_matches", spy_matches)
    monkeypatch.setattr(tokens.hmac, "compare_digest", spy_digest)

    assert api_token_authenticate(token) is not None
    assert agent_authenticate(agent.plain_token) is not None
    assert api_token_authenticate(token[:-2] + "xx") is None

    assert len(matches) == 3
    assert len(digests) == 3  # every comparison went through hmac.compare_digest


# --- API tokens ------------------------------------------------------------------------------


def test_it_refuses_a_key_id_after_the_limit_without_checking_its_secret(client, monkeypatch):
    good = api_token_create(user=UserFactory())

    assert _fail(client, ME, _wrong_secret(good)) == [401] * LIMIT

    checked = []
    monkeypatch.setattr("accounts.api.api_token_authenticate", lambda token: checked.append(token))
    response = client.get(ME, **_bearer(good))

    assert response.status_code == 429
    assert response.json()["error"] == "rate_limited"
    assert response.json()["detail"]
    assert 1 <= int(response["Retry-After"]) <= 300
    assert checked == []  # the right secret was not even looked at


def test_ten_bad_tokens_from_an_address_then_a_valid_token_from_it_is_accepted(client):
    good = _bearer(api_token_create(user=UserFactory()))

    bad = [f"Bearer wst_0000000000000000_bad{i}" for i in range(10)]
    assert [client.get(ME, HTTP_AUTHORIZATION=header).status_code for header in bad] == [401] * 10

    assert client.get(ME, **good).status_code == 200


def test_a_blocked_key_id_does_not_block_another_key_from_the_same_address(client):
    attacked = api_token_create(user=UserFactory())
    other = api_token_create(user=UserFactory())
    _fail(client, ME, _wrong_secret(attacked), LIMIT)

    assert client.get(ME, HTTP_AUTHORIZATION=_wrong_secret(attacked)).status_code == 429
    assert client.get(ME, **_bearer(attacked)).status_code == 429
    assert client.get(ME, **_bearer(other)).status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        "Bearer not-a-token",  # no key id at all
        "Bearer wsa_1234567890abcdef_secret",  # another kind's prefix
        "Basic dXNlcjpwYXNz",  # not a bearer token
        BAD_API,  # well formed, unknown key id
    ],
)
def test_malformed_credentials_and_unknown_key_ids_hit_the_per_address_budget(client, header):
    good = _bearer(api_token_create(user=UserFactory()))
    other_address = Client(REMOTE_ADDR=_address())

    assert _fail(client, ME, header, MALFORMED_LIMIT) == [401] * MALFORMED_LIMIT
    refused = client.get(ME, HTTP_AUTHORIZATION=header)

    assert refused.status_code == 429
    assert refused.json()["error"] == "rate_limited"
    assert int(refused["Retry-After"]) >= 1
    # A valid token from the same address is still accepted, and other addresses are untouched.
    assert client.get(ME, **good).status_code == 200
    assert other_address.get(ME, HTTP_AUTHORIZATION=header).status_code == 401
    ratelimit.reset(*_scopes_of(other_address.defaults["REMOTE_ADDR"]))


def test_the_address_budget_does_not_count_guesses_at_a_known_key_id(client, settings):
    settings.RATELIMIT_TOKEN_FAILURES = 0  # only the address budget is on
    good = api_token_create(user=UserFactory())
    _fail(client, ME, _wrong_secret(good), MALFORMED_LIMIT)

    assert client.get(ME, HTTP_AUTHORIZATION=BAD_API).status_code == 401


def test_it_never_counts_successes(client):
    token = api_token_create(user=UserFactory())

    for _ in range(3 * LIMIT):
        assert client.get(ME, **_bearer(token)).status_code == 200
    assert _fail(client, ME, _wrong_secret(token), LIMIT - 1) == [401] * (LIMIT - 1)

    assert client.get(ME, **_bearer(token)).status_code == 200


def test_it_lets_the_key_in_again_after_the_window(client, settings):
    settings.RATELIMIT_WINDOW = 1  # the cache expires keys on the real clock
    token = api_token_create(user=UserFactory())
    _fail(client, ME, _wrong_secret(token))
    assert client.get(ME, **_bearer(token)).status_code == 429

    time.sleep(1.2)

    assert client.get(ME, **_bearer(token)).status_code == 200


def test_the_retry_after_counts_down_from_the_first_failure(client):
    token = api_token_create(user=UserFactory())
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        _fail(client, ME, _wrong_secret(token))
    with time_machine.travel(start + timedelta(seconds=200), tick=False):
        response = client.get(ME, **_bearer(token))

    assert response.status_code == 429
    assert response["Retry-After"] == "100"


def test_requests_without_credentials_are_neither_counted_nor_refused(client):
    for _ in range(2 * MALFORMED_LIMIT):
        assert client.get(ME).status_code == 401
    _fail(client, ME, BAD_API, MALFORMED_LIMIT)

    # A blocked address without a token is still just "no credentials".
    assert client.get(ME).status_code == 401


def test_a_revoked_token_is_not_a_guess(client):
    token = api_token_create(user=UserFactory())
    api_token_revoke(token=ApiToken.objects.get())

    assert _fail(client, ME, f"Bearer {token}", 2 * LIMIT) == [401] * (2 * LIMIT)


def test_a_blocked_key_id_is_blocked_from_every_address(client):
    token = api_token_create(user=UserFactory())
    _fail(client, ME, _wrong_secret(token))
    elsewhere = Client(REMOTE_ADDR="192.0.2.77")

    # Spreading guesses at one token over many addresses buys nothing.
    assert elsewhere.get(ME, HTTP_AUTHORIZATION=_wrong_secret(token)).status_code == 429


def test_it_ignores_x_forwarded_for(client):
    for index in range(MALFORMED_LIMIT):
        client.get(ME, HTTP_AUTHORIZATION=BAD_API, HTTP_X_FORWARDED_FOR=f"203.0.113.{index}")

    assert client.get(ME, HTTP_AUTHORIZATION=BAD_API).status_code == 429


def test_a_limit_of_zero_disables_it(client, settings):
    settings.RATELIMIT_TOKEN_FAILURES = 0
    settings.RATELIMIT_MALFORMED_FAILURES = 0
    token = api_token_create(user=UserFactory())

    assert _fail(client, ME, _wrong_secret(token), LIMIT + 2) == [401] * (LIMIT + 2)
    assert _fail(client, ME, BAD_API, MALFORMED_LIMIT + 2) == [401] * (MALFORMED_LIMIT + 2)
    assert client.get(ME, **_bearer(token)).status_code == 200


# --- agent tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url", "ok"),
    [
        ("get", MANIFEST, 200),
        ("post", LIFECYCLE, 204),
        pytest.param("get", REINIT, 200, marks=SEEN),
    ],
)
def test_bad_agent_tokens_from_the_agents_host_never_block_its_agents(client, method, url, ok):
    """Observation 3 of issue 12: ``wsa_0000000000000000_bad$i`` ten times from the address of
    a worker host (any process there can send them) must not lock out that host's agents."""
    agent = AgentFactory()
    bad = [f"Bearer wsa_0000000000000000_bad{i}" for i in range(10)]
    assert [client.get(MANIFEST, HTTP_AUTHORIZATION=h).status_code for h in bad] == [401] * 10

    response = getattr(client, method)(
        url,
        data='{"state": "ready"}' if method == "post" else None,
        content_type="application/json",
        **_bearer(agent.plain_token),
    )

    # Reinit answers 200 at once here: the new agent was never initialised for its owner.
    assert response.status_code == ok


@pytest.mark.parametrize(
    ("method", "url"),
    [("get", MANIFEST), ("post", LIFECYCLE), pytest.param("get", REINIT, marks=SEEN)],
)
def test_a_guessed_agent_key_id_is_refused_everywhere_but_not_its_neighbours(client, method, url):
    agent, neighbour = AgentFactory(), AgentFactory()
    _fail(client, MANIFEST, _wrong_secret(agent.plain_token))

    answers = [
        getattr(client, method)(
            url,
            data='{"state": "ready"}' if method == "post" else None,
            content_type="application/json",
            **_bearer(token),
        )
        for token in (agent.plain_token, neighbour.plain_token)
    ]

    assert answers[0].status_code == 429
    assert answers[0].json()["error"] == "rate_limited"
    assert int(answers[0]["Retry-After"]) >= 1
    assert answers[1].status_code in (200, 204)


@SEEN
def test_failures_on_the_reinit_endpoint_count_too(client):
    agent = AgentFactory()
    assert _fail(client, REINIT, _wrong_secret(agent.plain_token)) == [401] * LIMIT

    assert client.get(MANIFEST, **_bearer(agent.plain_token)).status_code == 429


def test_a_retired_agent_token_is_not_a_guess(client, settings):
    # A worker host retiring many agents at once must not lock out anything.
    settings.RATELIMIT_MALFORMED_FAILURES = 1
    healthy = AgentFactory()
    retired = [AgentFactory() for _ in range(LIMIT + 1)]
    WorkspaceAgent.objects.filter(id__in=[a.id for a in retired]).update(retired_at=timezone.now())

    for agent in retired:
        assert _fail(client, MANIFEST, _bearer(agent.plain_token)["HTTP_AUTHORIZATION"], 2) == [
            401,
            401,
        ]

    assert client.get(MANIFEST, HTTP_AUTHORIZATION=BAD_AGENT).status_code == 401  # budget unspent
    assert client.get(MANIFEST, **_bearer(healthy.plain_token)).status_code == 200


def test_agent_and_api_token_failures_are_counted_apart(client):
    good = _bearer(api_token_create(user=UserFactory()))
    _fail(client, MANIFEST, BAD_AGENT, MALFORMED_LIMIT)

    assert client.get(MANIFEST, HTTP_AUTHORIZATION=BAD_AGENT).status_code == 429
    assert client.get(ME, HTTP_AUTHORIZATION=BAD_API).status_code == 401
    assert client.get(ME, **good).status_code == 200


# --- sign-in ---------------------------------------------------------------------------------


def _login(client: Client, url: str, password: str, username: str = "alice"):
    return client.post(url, {"username": username, "password": password})


def test_it_refuses_sign_ins_after_the_limit_without_checking_the_password(client, monkeypatch):
    UserFactory(username="alice")
    for _ in range(LIMIT):
        assert _login(client, "/login/", "wrong").status_code == 200

    checked = []
    monkeypatch.setattr(
        "accounts.backends.UserBackend.authenticate",
        lambda self, request, **credentials: checked.append(credentials),
    )
    response = _login(client, "/login/", PASSWORD)

    assert response.status_code == 429
    assert "Too many failed sign-ins, try again in 5 minutes" in response.content.decode()
    assert int(response["Retry-After"]) >= 1
    assert "_auth_user_id" not in client.session
    assert checked == []


def test_the_admin_login_counts_and_is_refused_too(client):
    UserFactory(username="alice", is_staff=True)
    for _ in range(LIMIT):
        _login(client, "/admin/login/", "wrong")

    admin = _login(client, "/admin/login/", PASSWORD)
    page = _login(client, "/login/", PASSWORD)

    assert admin.status_code == 200 and "_auth_user_id" not in client.session
    assert page.status_code == 429


def test_successful_sign_ins_are_never_counted(client):
    UserFactory(username="alice")
    for _ in range(2 * LIMIT):
        assert _login(client, "/login/", PASSWORD).status_code == 302
        client.logout()
    for _ in range(LIMIT - 1):
        _login(client, "/login/", "wrong")

    assert _login(client, "/login/", PASSWORD).status_code == 302


def test_another_user_at_the_same_address_can_still_sign_in(client):
    UserFactory(username="alice")
    UserFactory(username="bob")
    for _ in range(LIMIT):
        _login(client, "/login/", "wrong", "bob")
    assert _login(client, "/login/", PASSWORD, "bob").status_code == 429

    assert _login(client, "/login/", PASSWORD, "alice").status_code == 302


def test_the_locked_user_can_still_sign_in_from_another_address(client):
    UserFactory(username="alice")
    for _ in range(LIMIT):
        _login(client, "/login/", "wrong")
    elsewhere = Client(REMOTE_ADDR=_address())

    assert _login(client, "/login/", PASSWORD).status_code == 429
    assert _login(elsewhere, "/login/", PASSWORD).status_code == 302
    ratelimit.reset(*_scopes_of(elsewhere.defaults["REMOTE_ADDR"]))


def test_the_per_user_budget_caps_guessing_from_many_addresses(client):
    UserFactory(username="alice")
    UserFactory(username="bob")
    guessers = [Client(REMOTE_ADDR=_address()) for _ in range(USER_LIMIT)]
    try:
        # One wrong password from each of USER_LIMIT addresses: none reaches the per-address
        # limit, together they spend alice's budget.
        for guesser in guessers:
            assert _login(guesser, "/login/", "wrong").status_code == 200

        assert _login(client, "/login/", PASSWORD).status_code == 429
        assert _login(client, "/login/", PASSWORD, "bob").status_code == 302
    finally:
        ratelimit.reset(*(s for g in guessers for s in _scopes_of(g.defaults["REMOTE_ADDR"])))


def test_unknown_user_names_are_limited_alike_and_case_buys_no_budget(client):
    UserFactory(username="alice")
    for username in ("bob", "Bob", "BOB")[:LIMIT]:
        assert _login(client, "/login/", "wrong", username).status_code == 200
    for username in ("ALICE", "Alice", "alice")[:LIMIT]:
        assert _login(client, "/login/", "wrong", username).status_code == 200

    unknown = _login(client, "/login/", PASSWORD, "bob")
    known = _login(client, "/login/", PASSWORD, "alice")

    # The same answer whether the user exists or not: nothing to enumerate.
    assert unknown.status_code == known.status_code == 429


# --- the counters ----------------------------------------------------------------------------


def test_concurrent_failures_are_all_counted(settings):
    settings.RATELIMIT_TOKEN_FAILURES = 10_000
    scope = ratelimit.key_scope(ratelimit.API_TOKEN, secrets.token_hex(8))

    def fail_many():
        for _ in range(25):
            ratelimit.record_failure(scope)

    threads = [threading.Thread(target=fail_many) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        settings.RATELIMIT_TOKEN_FAILURES = 200
        assert ratelimit.retry_after(scope) is not None
        settings.RATELIMIT_TOKEN_FAILURES = 201
        assert ratelimit.retry_after(scope) is None
    finally:
        ratelimit.reset(scope)


@pytest.mark.parametrize(
    ("remote", "key"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("", "unknown"),
        ("not an address", "unknown"),
    ],
)
def test_it_keys_clients_by_address_and_ipv6_by_64(remote, key):
    assert ratelimit.address_of(remote) == key


@pytest.mark.parametrize(
    ("broker", "backend", "location"),
    [
        ("redis://cache.internal:6379/0", "RedisCache", "redis://cache.internal:6379/0"),
        ("rediss://u:p@cache.internal:6380/2", "RedisCache", "rediss://u:p@cache.internal:6380/2"),
        ("redis+socket:///var/run/redis.sock", "RedisCache", "unix:///var/run/redis.sock"),
        ("amqp://guest@rabbit//", "LocMemCache", None),
    ],
)
def test_the_cache_is_the_brokers_redis(broker, backend, location):
    cache = _caches(broker)["default"]

    assert cache["BACKEND"].endswith(backend)
    assert cache.get("LOCATION") == location


@pytest.mark.django_db(transaction=True)
def test_the_counters_are_shared_by_every_web_process():
    """Failures counted by a separate uvicorn process block this process's requests too."""
    agent = AgentFactory()
    local = Client()
    key = ratelimit.key_scope(ratelimit.AGENT_TOKEN, agent.token_key_id)
    try:
        with asgi_server(RATELIMIT_TOKEN_FAILURES=str(LIMIT)) as url:
            answers = [
                httpx.get(
                    f"{url}/api/v2/workspaceagents/me/reinit?wait=0",
                    headers={"Authorization": _wrong_secret(agent.plain_token)},
                    timeout=30,
                ).status_code
                for _ in range(LIMIT + 1)
            ]
        blocked = local.get(MANIFEST, **_bearer(agent.plain_token))
    finally:
        ratelimit.reset(key)

    assert answers == [401] * LIMIT + [429]
    assert blocked.status_code == 429


# --- when the cache is gone ------------------------------------------------------------------


def _limiter_logs(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "accounts.ratelimit"]


@pytest.fixture
def private_redis(client):
    """The limiter on a Redis of its own (private unix socket in a temporary directory), which
    the test may stop and start again on the same socket. Put back before ``client``'s
    counters are cleared."""
    from tests.operations.cluster import Redis, short_tempdir

    root = short_tempdir("wsrl-")
    server = Redis(root / "ratelimit.db")
    options = _caches(server.url)["default"]
    try:
        with pytest.MonkeyPatch.context() as patch:
            cache = RedisCache(options["LOCATION"], {"OPTIONS": options["OPTIONS"]})
            patch.setattr(ratelimit, "cache", cache)
            patch.setattr(ratelimit, "_health", ratelimit._CacheHealth())
            yield server
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_redis_outage_fails_open_logs_once_and_recovers_by_itself(
    client, private_redis, monkeypatch, caplog
):
    # Every request tries Redis (no quiet interval): the single warning then proves that the
    # log is per outage, not per request, and recovery is seen at the first request after.
    monkeypatch.setattr(ratelimit, "OUTAGE_PROBE_INTERVAL", 0.0)
    token = api_token_create(user=UserFactory())
    caplog.set_level(logging.INFO, logger="accounts.ratelimit")
    assert _fail(client, ME, _wrong_secret(token), 1) == [401]  # the cache works

    private_redis.stop()
    during = _fail(client, ME, _wrong_secret(token), 2 * LIMIT)
    during_good = client.get(ME, **_bearer(token)).status_code
    during_malformed = _fail(client, ME, BAD_API, MALFORMED_LIMIT + 1)
    logged = _limiter_logs(caplog)

    # Failing open: nothing counted, nothing refused, the valid token accepted.
    assert during == [401] * (2 * LIMIT)
    assert during_good == 200
    assert during_malformed == [401] * (MALFORMED_LIMIT + 1)
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert logged[0].levelno == logging.WARNING
    assert logged[0].getMessage().startswith("ratelimit_cache_unavailable")
    assert logged[0].exc_info is None  # no traceback

    private_redis.start()
    after = _fail(client, ME, _wrong_secret(token), LIMIT)  # 1 before + 3 now: the limit is 3
    assert after[:2] == [401, 401] and after[2] == 429
    assert client.get(ME, **_bearer(token)).status_code == 429
    back = [r.getMessage() for r in _limiter_logs(caplog)[1:]]
    assert len(back) == 1 and back[0].startswith("ratelimit_cache_back"), back


def test_while_redis_is_down_only_one_request_per_interval_tries_it(client, monkeypatch, caplog):
    calls = []

    class Down:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                calls.append(name)
                raise ConnectionError("redis is down")

            return fail

    token = api_token_create(user=UserFactory())
    with monkeypatch.context() as patch:
        patch.setattr(ratelimit, "cache", Down())
        patch.setattr(ratelimit, "_health", ratelimit._CacheHealth())
        patch.setattr(ratelimit, "OUTAGE_PROBE_INTERVAL", 3600.0)
        answers = _fail(client, ME, _wrong_secret(token), 10) + [client.get(ME, **_bearer(token))]

    assert answers[:10] == [401] * 10 and answers[10].status_code == 200
    assert calls == ["get_many"]  # the first request; every later one failed open at once
    assert len(_limiter_logs(caplog)) == 1
