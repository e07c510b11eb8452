"""Tokens are stored hashed; failed credentials are rate limited per client (accounts.ratelimit).

Every test uses its own random client address, so concurrent test runs sharing the embedded
Redis never see each other's counters, and clears its counters afterwards.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from datetime import timedelta

import httpx
import pytest
import time_machine
from django.http import HttpRequest
from django.test import Client
from django.utils import timezone

from accounts import ratelimit, tokens
from accounts.models import ApiToken
from accounts.services import api_token_authenticate, api_token_create, api_token_revoke
from config.settings import _caches
from tests.accounts.factories import UserFactory
from tests.processes import asgi_server
from tests.workspaces.factories import AgentFactory
from workspaces.models import WorkspaceAgent
from workspaces.services import agent_authenticate

pytestmark = pytest.mark.django_db

LIMIT = 3
PASSWORD = "correct horse battery staple"
MANIFEST = "/api/v2/workspaceagents/me/manifest"
LIFECYCLE = "/api/v2/workspaceagents/me/lifecycle"
REINIT = "/api/v2/workspaceagents/me/reinit?wait=0"
ME = "/api/v2/users/me"
BAD_API = "Bearer wst_0000000000000000_nope"
BAD_AGENT = "Bearer wsa_0000000000000000_nope"


@pytest.fixture
def address():
    """A random client address for this test; its counters are removed afterwards."""
    value = f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"
    yield value
    for kind in ratelimit.KINDS:
        ratelimit.reset(address=value, kind=kind)


@pytest.fixture(autouse=True)
def limits(settings):
    settings.RATELIMIT_LOGIN_FAILURES = LIMIT
    settings.RATELIMIT_TOKEN_FAILURES = LIMIT
    settings.RATELIMIT_WINDOW = 300
    return settings


@pytest.fixture
def client(address):
    return Client(REMOTE_ADDR=address, raise_request_exception=False)


def _fail(client: Client, url: str, header: str, times: int = LIMIT) -> list[int]:
    return [client.get(url, HTTP_AUTHORIZATION=header).status_code for _ in range(times)]


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


def test_it_refuses_api_tokens_after_the_limit_without_checking_them(client, monkeypatch):
    good = api_token_create(user=UserFactory())

    assert _fail(client, ME, BAD_API) == [401] * LIMIT

    checked = []
    monkeypatch.setattr("accounts.api.api_token_authenticate", lambda token: checked.append(token))
    response = client.get(ME, HTTP_AUTHORIZATION=f"Bearer {good}")

    assert response.status_code == 429
    assert response.json()["error"] == "rate_limited"
    assert response.json()["detail"]
    assert 1 <= int(response["Retry-After"]) <= 300
    assert checked == []  # the right token was not even looked at


def test_it_never_counts_successes(client):
    good = {"HTTP_AUTHORIZATION": f"Bearer {api_token_create(user=UserFactory())}"}

    for _ in range(3 * LIMIT):
        assert client.get(ME, **good).status_code == 200
    assert _fail(client, ME, BAD_API, LIMIT - 1) == [401] * (LIMIT - 1)

    assert client.get(ME, **good).status_code == 200


def test_it_lets_the_client_in_again_after_the_window(client, settings):
    settings.RATELIMIT_WINDOW = 1  # the cache expires keys on the real clock
    good = {"HTTP_AUTHORIZATION": f"Bearer {api_token_create(user=UserFactory())}"}
    _fail(client, ME, BAD_API)
    assert client.get(ME, **good).status_code == 429

    time.sleep(1.2)

    assert client.get(ME, **good).status_code == 200


def test_the_retry_after_counts_down_from_the_first_failure(client):
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        _fail(client, ME, BAD_API)
    with time_machine.travel(start + timedelta(seconds=200), tick=False):
        response = client.get(ME, HTTP_AUTHORIZATION=BAD_API)

    assert response.status_code == 429
    assert response["Retry-After"] == "100"


def test_requests_without_credentials_are_neither_counted_nor_refused(client):
    for _ in range(2 * LIMIT):
        assert client.get(ME).status_code == 401
    _fail(client, ME, BAD_API)

    # A blocked client without a token is still just "no credentials".
    assert client.get(ME).status_code == 401


def test_a_revoked_token_is_not_a_guess(client):
    token = api_token_create(user=UserFactory())
    api_token_revoke(token=ApiToken.objects.get())

    assert _fail(client, ME, f"Bearer {token}", 2 * LIMIT) == [401] * (2 * LIMIT)


def test_it_counts_each_client_address_apart(client, address):
    good = {"HTTP_AUTHORIZATION": f"Bearer {api_token_create(user=UserFactory())}"}
    _fail(client, ME, BAD_API)
    other = Client(REMOTE_ADDR="192.0.2.77")
    ratelimit.reset(address="192.0.2.77", kind=ratelimit.API_TOKEN)

    assert client.get(ME, **good).status_code == 429
    assert other.get(ME, **good).status_code == 200


def test_it_ignores_x_forwarded_for(client):
    for index in range(LIMIT):
        client.get(ME, HTTP_AUTHORIZATION=BAD_API, HTTP_X_FORWARDED_FOR=f"203.0.113.{index}")

    assert client.get(ME, HTTP_AUTHORIZATION=BAD_API).status_code == 429


def test_it_fails_open_when_the_cache_is_down(client, monkeypatch):
    class Broken:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise ConnectionError("redis is down")

            return fail

    good = {"HTTP_AUTHORIZATION": f"Bearer {api_token_create(user=UserFactory())}"}
    with monkeypatch.context() as patch:
        patch.setattr(ratelimit, "cache", Broken())

        assert _fail(client, ME, BAD_API, LIMIT + 1) == [401] * (LIMIT + 1)
        assert client.get(ME, **good).status_code == 200


def test_a_limit_of_zero_disables_it(client, settings):
    settings.RATELIMIT_TOKEN_FAILURES = 0

    assert _fail(client, ME, BAD_API, LIMIT + 2) == [401] * (LIMIT + 2)


# --- agent tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"), [("get", MANIFEST), ("post", LIFECYCLE), ("get", REINIT)]
)
def test_it_refuses_agent_tokens_after_the_limit(client, method, url):
    agent = AgentFactory()
    _fail(client, MANIFEST, BAD_AGENT)

    response = getattr(client, method)(
        url,
        data='{"state": "ready"}' if method == "post" else None,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {agent.plain_token}",
    )

    assert response.status_code == 429
    assert response.json()["error"] == "rate_limited"
    assert int(response["Retry-After"]) >= 1


def test_failures_on_the_reinit_endpoint_count_too(client):
    assert _fail(client, REINIT, BAD_AGENT) == [401] * LIMIT

    assert client.get(MANIFEST, HTTP_AUTHORIZATION=BAD_AGENT).status_code == 429


def test_a_retired_agent_token_is_not_a_guess(client):
    # A worker host retiring many agents at once must not lock out its healthy agents.
    healthy = AgentFactory()
    retired = [AgentFactory() for _ in range(LIMIT + 1)]
    WorkspaceAgent.objects.filter(id__in=[a.id for a in retired]).update(retired_at=timezone.now())

    for agent in retired:
        assert _fail(client, MANIFEST, f"Bearer {agent.plain_token}", 1) == [401]

    assert _fail(client, MANIFEST, f"Bearer {healthy.plain_token}", 1) == [200]


def test_agent_and_api_token_failures_are_counted_apart(client):
    good = {"HTTP_AUTHORIZATION": f"Bearer {api_token_create(user=UserFactory())}"}
    _fail(client, MANIFEST, BAD_AGENT)

    assert client.get(MANIFEST, HTTP_AUTHORIZATION=BAD_AGENT).status_code == 429
    assert client.get(ME, **good).status_code == 200


# --- sign-in ---------------------------------------------------------------------------------


def _login(client: Client, url: str, password: str):
    return client.post(url, {"username": "alice", "password": password})


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


# --- the counters ----------------------------------------------------------------------------


def _request(client_or_address) -> HttpRequest:
    request = HttpRequest()
    address = (
        client_or_address
        if isinstance(client_or_address, str)
        else client_or_address.defaults["REMOTE_ADDR"]
    )
    request.META["REMOTE_ADDR"] = address
    return request


def test_concurrent_failures_are_all_counted(address, settings):
    settings.RATELIMIT_TOKEN_FAILURES = 10_000
    request = _request(address)

    def fail_many():
        for _ in range(25):
            ratelimit.record_failure(request, ratelimit.API_TOKEN)

    threads = [threading.Thread(target=fail_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    settings.RATELIMIT_TOKEN_FAILURES = 200
    assert ratelimit.retry_after(request, ratelimit.API_TOKEN) is not None
    settings.RATELIMIT_TOKEN_FAILURES = 201
    assert ratelimit.retry_after(request, ratelimit.API_TOKEN) is None


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
    assert ratelimit.client_address(_request(remote)) == key


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
def test_the_counters_are_shared_by_every_web_process(settings):
    """Failures counted by a separate uvicorn process block this process's requests too."""
    agent = AgentFactory()
    local = Client()  # 127.0.0.1, like httpx against the server below
    for kind in ratelimit.KINDS:
        ratelimit.reset(address="127.0.0.1", kind=kind)
    try:
        with asgi_server(RATELIMIT_TOKEN_FAILURES=str(LIMIT)) as url:
            answers = [
                httpx.get(
                    f"{url}/api/v2/workspaceagents/me/reinit?wait=0",
                    headers={"Authorization": BAD_AGENT},
                    timeout=30,
                ).status_code
                for _ in range(LIMIT + 1)
            ]
        blocked = local.get(MANIFEST, HTTP_AUTHORIZATION=f"Bearer {agent.plain_token}")
    finally:
        for kind in ratelimit.KINDS:
            ratelimit.reset(address="127.0.0.1", kind=kind)

    assert answers == [401] * LIMIT + [429]
    assert blocked.status_code == 429
