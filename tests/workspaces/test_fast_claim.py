"""The claim's fast path (``workspaces.fast_claim``) through the real ASGI application.

Each test drives ``config.asgi.application`` in an event loop of its own (httpx's ASGI
transport), on the test database (transactional: the fast path has connections of its own) and
the test broker. A spy on the fast path's fallback tells which path answered: the fast path
must serve the common claim itself and hand every other request to the Django view unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

from accounts import ratelimit
from accounts.models import SYSTEM_USER_ID, ApiToken
from accounts.services import api_token_create
from config import env
from prebuilds.models import PrebuildClaim
from tests.accounts.factories import OrganizationFactory, UserFactory
from tests.workspaces.factories import PresetFactory, TemplateFactory, prebuild
from workspaces.jobs import RUN_JOB_TASK
from workspaces.models import Workspace, WorkspaceAgent, WorkspaceBuild

pytestmark = pytest.mark.django_db(transaction=True)

CLIENT = ("127.0.0.1", 40000)


def fresh_token(user) -> str:
    """A token that was used a moment ago (a first use goes to the view: it writes last_used)."""
    token = api_token_create(user=user)
    ApiToken.objects.filter(user=user).update(last_used_at=timezone.now())
    return token


class Served:
    """Which requests the fast path handed to the Django view."""

    def __init__(self) -> None:
        self.handed_over: list[str] = []


async def _post_all(bodies: list[tuple[str, Any]], served: Served, headers=None) -> list:
    """POST each (token, body) concurrently through the ASGI app; the answers, in order."""
    from config.asgi import application

    claim = application.claim
    fallback = claim.fallback

    async def spy(scope, receive, send):
        served.handed_over.append(scope["path"])
        await fallback(scope, receive, send)

    claim.fallback = spy
    transport = httpx.ASGITransport(app=application, client=CLIENT)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:

            async def one(token: str, body: Any) -> httpx.Response:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                return await http.post(
                    "/api/v2/workspaces",
                    content=content,
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/json",
                        **(headers or {}),
                    },
                )

            return await asyncio.gather(*(one(token, body) for token, body in bodies))
    finally:
        claim.fallback = fallback
        await claim.aclose()


def post(token: str, body: Any, **headers: str) -> tuple[httpx.Response, Served]:
    served = Served()
    [response] = asyncio.run(_post_all([(token, body)], served, headers))
    return response, served


def claim_body(preset, name: str = "dev") -> dict[str, str]:
    return {"name": name, "template_version_preset_id": str(preset.id)}


def broker_messages(queue: str) -> list[dict]:
    """The messages waiting in ``queue`` on the test broker, decoded."""
    import redis

    client = redis.Redis.from_url(env.redis_url_of_broker(settings.CELERY_BROKER_URL))
    try:
        return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    finally:
        client.close()


def task_args(message: dict) -> list:
    return json.loads(base64.b64decode(message["body"]))[0]


def test_it_serves_a_claim_on_the_event_loop():
    preset = PresetFactory()
    pool = prebuild(preset)
    alice = UserFactory()

    response, served = post(fresh_token(alice), claim_body(preset))

    assert served.handed_over == []
    assert response.status_code == 201
    document = response.json()
    assert (document["id"], document["name"], document["claimed_prebuild"]) == (
        str(pool.id),
        "dev",
        True,
    )
    assert document["owner"] == {"id": str(alice.id), "username": alice.username}
    assert document["latest_build"]["is_claim"] is True
    workspace = Workspace.objects.get(id=pool.id)
    assert (workspace.owner_id, workspace.name) == (alice.id, "dev")
    build = workspace.builds.order_by("-build_number").first()
    assert (build.transition, build.is_claim, build.initiator_id, build.reason) == (
        "start",
        True,
        alice.id,
        "claim",
    )
    assert build.job.status == "pending"
    assert PrebuildClaim.objects.get(workspace=workspace).claimed is True
    # The claim build's job is on the broker, as Celery itself would have put it there.
    mine = [m for m in broker_messages(build.job.queue) if task_args(m) == [str(build.job_id)]]
    assert [m["headers"]["task"] for m in mine] == [RUN_JOB_TASK]


def test_a_prebuild_whose_latest_build_changed_before_the_lock_is_looked_at_again(monkeypatch):
    from tests.prebuilds.test_claims import stale_first_lock

    preset = PresetFactory()
    pool = prebuild(preset)
    locks = stale_first_lock(monkeypatch)

    response, served = post(fresh_token(UserFactory()), claim_body(preset))

    assert served.handed_over == []
    assert [lock.id for lock in locks] == [pool.id, pool.id]
    assert response.status_code == 201 and response.json()["id"] == str(pool.id)
    assert list(pool.builds.order_by("build_number").values_list("build_number", "is_claim")) == [
        (1, False),
        (2, True),
    ]
    assert PrebuildClaim.objects.filter(workspace=pool).count() == 1


def _without_ids(document: dict) -> dict:
    document = json.loads(json.dumps(document))
    for key in ("id", "name", "created_at"):
        document.pop(key)
    document["owner"].pop("id")
    document["owner"].pop("username")
    document["latest_build"].pop("id")
    document["latest_build"].pop("initiator")
    for agent in document["agents"]:
        agent.pop("id")
        agent.pop("initialized_owner_id")
        agent.pop("last_seen_at")  # each prebuild's own
    return document


def test_its_answer_is_the_django_views_answer():
    preset = PresetFactory()
    prebuild(preset)
    prebuild(preset)
    token = fresh_token(UserFactory())

    fast, fast_served = post(token, claim_body(preset, "fast"))
    with override_settings(CLAIM_FAST_PATH=False):
        view, view_served = post(token, claim_body(preset, "view"))

    assert (fast_served.handed_over, view_served.handed_over) == ([], [])  # off: never called
    assert (fast.status_code, view.status_code) == (201, 201)
    assert _without_ids(fast.json()) == _without_ids(view.json())
    assert fast.json()["owner"] == view.json()["owner"]
    skip = {"content-length"}
    assert [(k, v) for k, v in fast.headers.items() if k not in skip] == [
        (k, v) for k, v in view.headers.items() if k not in skip
    ]


def test_over_https_it_adds_the_hsts_header_the_security_middleware_would():
    preset = PresetFactory()
    prebuild(preset)
    token = fresh_token(UserFactory())

    # (The view's middleware chain was built with the settings of its first request, so it is
    # not the reference here: the setting is.)
    with override_settings(
        SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"), SECURE_HSTS_SECONDS=600
    ):
        fast, served = post(token, claim_body(preset), **{"X-Forwarded-Proto": "https"})

    assert served.handed_over == []
    assert fast.status_code == 201
    assert fast.headers["strict-transport-security"] == "max-age=600; includeSubDomains"


def test_a_token_due_for_its_last_used_refresh_goes_to_the_view():
    preset = PresetFactory()
    prebuild(preset)
    user = UserFactory()
    token = api_token_create(user=user)  # never used: last_used_at is None

    response, served = post(token, claim_body(preset))

    assert served.handed_over == ["/api/v2/workspaces"]
    assert response.status_code == 201
    assert response.json()["claimed_prebuild"] is True
    assert ApiToken.objects.get(user=user).last_used_at is not None


def _state() -> tuple[int, int, int, list]:
    return (
        Workspace.objects.count(),
        WorkspaceBuild.objects.count(),
        PrebuildClaim.objects.count(),
        sorted(Workspace.objects.values_list("owner_id", "name")),
    )


@pytest.mark.parametrize(
    ("case", "status", "error"),
    [
        ("bad-token", 401, "unauthorized"),
        ("unknown-preset", 404, "not_found"),
        ("foreign-organization", 404, "not_found"),
        ("bad-name", 400, "invalid_name"),
        ("unknown-field", 400, "unknown_fields"),
        ("not-json", 400, "invalid_json"),
        ("name-taken", 409, "name_taken"),
    ],
)
def test_errors_are_the_views_answers_and_change_nothing(case, status, error):
    preset = PresetFactory()
    prebuild(preset)
    alice = UserFactory()
    token = fresh_token(alice)
    body: Any = claim_body(preset)
    if case == "bad-token":
        token = "wst_0000000000000000_nope"
    elif case == "unknown-preset":
        body = claim_body(PresetFactory.build(id=uuid.uuid4()))
    elif case == "foreign-organization":
        foreign = PresetFactory(
            template_version=TemplateFactory(organization=OrganizationFactory()).active_version
        )
        prebuild(foreign)
        body = claim_body(foreign)
    elif case == "bad-name":
        body = claim_body(preset, "Not A Name")
    elif case == "unknown-field":
        body = {**claim_body(preset), "owner": "bob"}
    elif case == "not-json":
        body = b"{not json"
    elif case == "name-taken":
        prebuild(preset)
        post(token, claim_body(preset, "dev"))  # alice now has "dev"
    before = _state()

    response, served = post(token, body)

    assert served.handed_over == ["/api/v2/workspaces"]
    assert response.status_code == status
    assert response.json()["error"] == error
    assert _state() == before


def _wrong_secret(token: str) -> str:
    prefix, key_id, _ = token.split("_", 2)
    return f"{prefix}_{key_id}_{'x' * 43}"


def test_a_blocked_key_id_gets_429_from_the_view_and_other_keys_are_still_served():
    """The fast path checks the presented key id's failures (accounts.ratelimit) before the
    token is looked at: a blocked key id goes to the view (429, nothing claimed), while another
    user's valid token from the same address is still served here."""
    preset = PresetFactory()
    prebuild(preset)
    attacked, other = fresh_token(UserFactory()), fresh_token(UserFactory())
    key = ratelimit.key_scope(ratelimit.API_TOKEN, attacked.split("_")[1])
    try:
        with override_settings(RATELIMIT_TOKEN_FAILURES=2, RATELIMIT_MALFORMED_FAILURES=2):
            for _ in range(2):
                response = post(_wrong_secret(attacked), claim_body(preset))[0]
                assert response.status_code == 401
            # Unknown key ids spend only the address's budget, never a valid key's.
            for _ in range(2):
                assert post("wst_0000000000000000_nope", claim_body(preset))[0].status_code == 401
            blocked, blocked_served = post(attacked, claim_body(preset))
            claims_after_block = PrebuildClaim.objects.count()
            served_answer, other_served = post(other, claim_body(preset, "other"))
    finally:
        ratelimit.reset(key, ratelimit.address_scope(ratelimit.API_TOKEN, CLIENT[0]))

    # Blocked: even the right secret is refused before it is looked at, and nothing is claimed.
    assert blocked_served.handed_over == ["/api/v2/workspaces"]
    assert blocked.status_code == 429
    assert blocked.json()["error"] == "rate_limited"
    assert claims_after_block == 0
    assert other_served.handed_over == []
    assert served_answer.status_code == 201, served_answer.text


@pytest.mark.parametrize("pool", ["empty", "none-kept", "starting"])
def test_without_a_prebuild_to_claim_the_view_builds_cold_and_records_the_miss(pool):
    preset = PresetFactory(desired_instances=None if pool == "none-kept" else 1)
    if pool == "starting":
        prebuild(preset, ready=False)  # the fast path finds nothing claimable either
    alice = UserFactory()

    response, served = post(fresh_token(alice), claim_body(preset))

    assert served.handed_over == ["/api/v2/workspaces"]
    assert response.status_code == 201
    assert response.json()["claimed_prebuild"] is False
    assert Workspace.objects.get(id=response.json()["id"]).owner_id == alice.id
    # The view records the miss with the reason it finds (issue 17: a preset without a pool
    # is a miss too, ``declares_none``).
    [miss] = PrebuildClaim.objects.filter(claimed=False)
    expected = {"empty": "pool_empty", "none-kept": "declares_none", "starting": "starting"}
    assert miss.miss_reason == expected[pool]


def test_a_disallowed_host_goes_to_the_view():
    preset = PresetFactory()
    prebuild(preset)

    response, served = post(fresh_token(UserFactory()), claim_body(preset), Host="evil.example")

    assert served.handed_over == ["/api/v2/workspaces"]
    assert response.status_code == 400  # Django's DisallowedHost answer
    assert not PrebuildClaim.objects.exists()


def test_concurrent_claims_never_share_a_workspace_and_misses_are_built_cold():
    preset = PresetFactory()
    pool = {str(prebuild(preset).id) for _ in range(8)}
    users = [UserFactory() for _ in range(20)]
    bodies = [(fresh_token(user), claim_body(preset, "dev")) for user in users]
    served = Served()

    answers = asyncio.run(_post_all(bodies, served))

    assert [a.status_code for a in answers] == [201] * 20
    claimed = [a.json()["id"] for a in answers if a.json()["claimed_prebuild"]]
    assert sorted(claimed) == sorted(pool)  # each prebuild exactly once
    assert len(served.handed_over) >= 12  # every miss went to the view, which built cold
    cold = [a.json()["id"] for a in answers if not a.json()["claimed_prebuild"]]
    assert len(set(cold)) == 12 and not set(cold) & pool
    for workspace_id in pool:
        assert WorkspaceBuild.objects.filter(workspace_id=workspace_id, is_claim=True).count() == 1


def test_with_the_fast_path_off_every_claim_goes_to_the_view():
    preset = PresetFactory()
    prebuild(preset)

    with override_settings(CLAIM_FAST_PATH=False):
        response, served = post(fresh_token(UserFactory()), claim_body(preset))

    assert response.status_code == 201 and response.json()["claimed_prebuild"] is True
    assert served.handed_over == []  # the fast path never saw it


def test_with_the_rate_limiters_cache_down_the_view_claims_and_the_outage_is_logged_once(
    monkeypatch,
):
    class Down:
        """The limiter's cache with Redis gone: every read and write fails."""

        async def aget_many(self, *args, **kwargs):
            raise ConnectionError("redis is down")

        def get_many(self, *args, **kwargs):
            raise ConnectionError("redis is down")

        add = incr = get_many

    preset = PresetFactory()
    prebuild(preset)
    prebuild(preset)
    monkeypatch.setattr(ratelimit, "cache", Down())
    monkeypatch.setattr(ratelimit, "_health", ratelimit._CacheHealth())
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("accounts.ratelimit", "workspaces.fast_claim")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with override_settings(RATELIMIT_TOKEN_FAILURES=3):
            answers = [post(fresh_token(UserFactory()), claim_body(preset)) for _ in range(2)]
    finally:
        for logger in loggers:
            logger.removeHandler(handler)

    # The fast path cannot read the limiter: it hands over; the view fails open and claims.
    for response, served in answers:
        assert served.handed_over == ["/api/v2/workspaces"]
        assert response.status_code == 201, response.text
        assert response.json()["claimed_prebuild"]
    # One line for the outage (from the limiter), none per request, no traceback.
    assert [r.getMessage().split()[0] for r in records] == ["ratelimit_cache_unavailable"]
    assert records[0].exc_info is None


def test_a_fast_claim_asks_for_a_refill_after_it_commits():
    from django.core.cache import cache

    from prebuilds import refill
    from workspaces import routing

    cache.delete(refill.PENDING_KEY)  # nothing pending from an earlier claim
    before = broker_messages(routing.CONTROL_QUEUE)
    preset = PresetFactory()
    prebuild(preset)

    response, served = post(fresh_token(UserFactory()), claim_body(preset))

    assert response.status_code == 201 and served.handed_over == []
    refills = [
        m
        for m in broker_messages(routing.CONTROL_QUEUE)
        if m["headers"]["task"] == refill.REFILL_TASK and m not in before
    ]
    assert len(refills) == 1
    # A second claim while that pass is pending is coalesced into it.
    prebuild(preset)
    response, served = post(fresh_token(UserFactory()), claim_body(preset, "dev2"))
    assert response.status_code == 201 and served.handed_over == []
    after = [m for m in broker_messages(routing.CONTROL_QUEUE) if m not in before]
    assert len([m for m in after if m["headers"]["task"] == refill.REFILL_TASK]) == 1
    cache.delete(refill.PENDING_KEY)


def test_a_prebuild_whose_agent_is_gone_is_never_handed_out(settings):
    """Its agent not heard from within AGENT_DISCONNECT_TIMEOUT: the fast path finds nothing
    to claim, the view builds cold, and the prebuild stays in the pool (the reconciler
    replaces it)."""
    settings.AGENT_DISCONNECT_TIMEOUT = 30
    preset = PresetFactory(desired_instances=1)
    gone = prebuild(preset)
    WorkspaceAgent.objects.filter(workspace=gone).update(
        last_seen_at=timezone.now() - timedelta(seconds=31)
    )
    alice = UserFactory()

    response, served = post(fresh_token(alice), claim_body(preset))

    assert served.handed_over == ["/api/v2/workspaces"]
    assert response.status_code == 201
    assert response.json()["claimed_prebuild"] is False
    assert response.json()["id"] != str(gone.id)
    assert Workspace.objects.get(id=gone.id).owner_id == SYSTEM_USER_ID
    assert PrebuildClaim.objects.filter(claimed=False).count() == 1


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
def test_a_claim_body_that_is_not_declared_json_is_the_views_415(content_type):
    # Without the check the fast path would claim: the body itself is a perfect claim.
    preset = PresetFactory()
    prebuild(preset)
    alice = UserFactory()
    before = _state()

    response, served = post(
        fresh_token(alice), claim_body(preset), **{"Content-Type": content_type}
    )

    assert served.handed_over == ["/api/v2/workspaces"]
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"
    assert _state() == before


def test_a_claim_declared_json_with_a_charset_is_still_served_fast():
    preset = PresetFactory()
    prebuild(preset)

    response, served = post(
        fresh_token(UserFactory()),
        claim_body(preset),
        **{"Content-Type": "application/json; charset=utf-8"},
    )

    assert served.handed_over == []
    assert response.status_code == 201
