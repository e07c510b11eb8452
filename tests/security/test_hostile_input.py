"""Hostile and malformed input: the JSON API never answers 500, and errors change nothing.

Property-based (hypothesis) over the write endpoints of DESIGN.md §7: random JSON of any type
and nesting, hostile strings (NUL, RTL overrides, emoji, lone surrogates, SQL), wrong types,
unknown and missing fields, non-JSON and non-UTF-8 bodies, wrong content types, huge bodies.
Every answer is a success or a JSON ``{"error", "detail"}`` with a 4xx status; on an error the
rows of the affected tables are exactly as before.

The template file parser gets the same treatment: any text is either a spec or a
``TemplateFileError``, and ``push_template`` writes nothing for a bad file.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any
from urllib.parse import quote

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.services import api_token_create
from prebuilds.models import AuditEntry, PrebuildClaim, PrebuildsSettings
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import AgentFactory, BuildFactory, PresetFactory, WorkspaceFactory
from workspaces.models import (
    ProvisionerJob,
    Template,
    TemplateVersion,
    TemplateVersionPreset,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
)
from workspaces.template_files import TemplateFileError, parse_template

pytestmark = pytest.mark.django_db

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "dev\x00",
    "\u202eved",  # right-to-left override
    "\u200f\u200e",
    "🚀💥",
    "'; DROP TABLE workspaces_workspace; --",
    '" OR 1=1 --',
    "${jndi:ldap://x}",
    "<script>alert(1)</script>",
    "../../etc/passwd",
    "\ud800",  # lone surrogate: valid in JSON, not encodable as UTF-8
    "a" * 70,
    "x" * 100_000,
    "start\n",
    "START",
    "ready ",
    "00000000-0000-0000-0000-000000000000",
]

hostile_text = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=80),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    hostile_text,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(hostile_text, children, max_size=5),
    ),
    max_leaves=20,
)
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/xml",
    "",
]


def _encoded(value: Any) -> bytes:
    # Lone surrogates survive json.dumps (escaped as \\udXXX), as a hostile client would send.
    return json.dumps(value).encode()


def bodies(fields: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Request bodies around a valid one (``fields``): mutated, extended, random, broken."""
    valid = st.just(fields)
    mutated = st.builds(
        lambda base, key, value: {**base, key: value},
        valid,
        st.sampled_from(sorted(fields)),
        json_values,
    )
    extended = st.builds(
        lambda base, key, value: {**base, key: value}, valid, hostile_text, json_values
    )
    missing = st.builds(
        lambda base, key: {k: v for k, v in base.items() if k != key},
        valid,
        st.sampled_from(sorted(fields)),
    )
    structured = st.one_of(mutated, extended, missing, json_values).map(_encoded)
    broken = st.one_of(
        st.binary(max_size=200),
        st.sampled_from(
            [
                b"",
                b"{",
                b"null",
                b"[]",
                b'{"a":1}{"b":2}',
                b"\xff\xfe{}",
                b'{"name": "\xc3\x28"}',
                b"NaN",
                b"1e999999",
                b"1" * 5000,
                b"[" * 50_000 + b"]" * 50_000,
                b'{"x":' * 50_000 + b"1" + b"}" * 50_000,
            ]
        ),
    )
    return st.one_of(structured, broken)


def snapshot() -> dict[str, Any]:
    """Rows of every table the write endpoints may change, and the values they may change."""
    return {
        "workspaces": list(Workspace.objects.order_by("id").values_list("id", "name", "owner_id")),
        "builds": WorkspaceBuild.objects.count(),
        "jobs": ProvisionerJob.objects.count(),
        "claims": PrebuildClaim.objects.count(),
        "settings": list(PrebuildsSettings.objects.values_list("reconciliation_paused")),
        "pool_sizes": list(
            TemplateVersionPreset.objects.order_by("id").values_list("id", "desired_instances")
        ),
        "audit_entries": AuditEntry.objects.count(),
        "agents": list(
            WorkspaceAgent.objects.order_by("id").values_list(
                "id", "lifecycle_state", "lifecycle_changed_at"
            )
        ),
    }


def assert_safe(response, before: dict[str, Any]) -> None:
    """A success, or a JSON error with a 4xx status that changed nothing."""
    assert response.status_code < 500, response.content[:500]
    if response.status_code >= 400:
        assert response["Content-Type"] == "application/json", response.content[:200]
        body = response.json()
        assert set(body) == {"error", "detail"}
        assert isinstance(body["error"], str) and isinstance(body["detail"], str)
        assert snapshot() == before


@pytest.fixture
def world():
    """A member with a workspace and its agent, a staff user, and a usable template/preset."""
    member = UserFactory()
    staff = UserFactory(is_staff=True)
    preset = PresetFactory(desired_instances=None)
    workspace = WorkspaceFactory(owner=member, template=preset.template_version.template)
    build = BuildFactory(workspace=workspace, preset=preset)
    agent = AgentFactory(build=build)
    return {
        "member": f"Bearer {api_token_create(user=member)}",
        "staff": f"Bearer {api_token_create(user=staff)}",
        "agent": f"Bearer {agent.plain_token}",
        "preset": preset,
        "workspace": workspace,
    }


@pytest.fixture
def api():
    return Client(raise_request_exception=False)


def _send(api: Client, method: str, url: str, body: bytes, content_type: str, token: str):
    return api.generic(method, url, data=body, content_type=content_type, HTTP_AUTHORIZATION=token)


@PROPERTY
@given(data=st.data())
def test_creating_workspaces_never_fails_badly(api, world, data):
    preset = world["preset"]
    valid = data.draw(
        st.sampled_from(
            [
                {"name": "dev", "template_version_preset_id": str(preset.id)},
                {"name": "dev", "template_id": str(preset.template_version.template_id)},
            ]
        )
    )
    body = data.draw(bodies(valid))
    content_type = data.draw(st.sampled_from(CONTENT_TYPES))
    before = snapshot()

    response = _send(api, "POST", "/api/v2/workspaces", body, content_type, world["member"])

    assert_safe(response, before)


@PROPERTY
@given(data=st.data())
def test_queueing_builds_never_fails_badly(api, world, data):
    body = data.draw(bodies({"transition": "stop"}))
    content_type = data.draw(st.sampled_from(CONTENT_TYPES))
    url = f"/api/v2/workspaces/{world['workspace'].id}/builds"
    before = snapshot()

    response = _send(api, "POST", url, body, content_type, world["member"])

    assert_safe(response, before)


@PROPERTY
@given(data=st.data())
def test_prebuild_settings_never_fail_badly(api, world, data):
    body = data.draw(bodies({"reconciliation_paused": True}))
    content_type = data.draw(st.sampled_from(CONTENT_TYPES))
    before = snapshot()

    response = _send(api, "PUT", "/api/v2/prebuilds/settings", body, content_type, world["staff"])

    assert_safe(response, before)


@PROPERTY
@given(data=st.data())
def test_setting_a_pool_size_never_fails_badly(api, world, data):
    body = data.draw(bodies({"desired_instances": 2}))
    content_type = data.draw(st.sampled_from(CONTENT_TYPES))
    url = f"/api/v2/prebuilds/presets/{world['preset'].id}"
    before = snapshot()

    response = _send(api, "PUT", url, body, content_type, world["staff"])

    assert_safe(response, before)


@PROPERTY
@given(data=st.data())
def test_lifecycle_reports_never_fail_badly(api, world, data):
    body = data.draw(bodies({"state": "ready"}))
    content_type = data.draw(st.sampled_from(CONTENT_TYPES))
    before = snapshot()

    response = _send(
        api, "POST", "/api/v2/workspaceagents/me/lifecycle", body, content_type, world["agent"]
    )

    assert_safe(response, before)


@PROPERTY
@given(
    # Ids that route to the workspace endpoints: one non-empty path segment ("/" or an empty id
    # would be another URL, answered by Django's own 404 page, see the README).
    workspace_id=hostile_text.filter(lambda text: text and "/" not in text),
    suffix=st.sampled_from(["", "/builds"]),
)
def test_hostile_workspace_ids_are_not_found(api, world, workspace_id, suffix):
    path = quote(workspace_id.encode("utf-8", "surrogatepass"), safe="")
    before = snapshot()
    method = "POST" if suffix else "GET"

    response = _send(
        api,
        method,
        f"/api/v2/workspaces/{path}{suffix}",
        b'{"transition": "start"}',
        "application/json",
        world["member"],
    )

    assert_safe(response, before)
    assert response.status_code == 404


HUGE = json.dumps({"name": "x" * (5 * 1024 * 1024)}).encode()
ENDPOINTS = [
    ("POST", "/api/v2/workspaces", "member"),
    ("POST", "/api/v2/workspaces/{workspace}/builds", "member"),
    ("PUT", "/api/v2/prebuilds/settings", "staff"),
    ("PUT", "/api/v2/prebuilds/presets/{preset}", "staff"),
    ("POST", "/api/v2/workspaceagents/me/lifecycle", "agent"),
]


@pytest.mark.parametrize(("method", "url", "caller"), ENDPOINTS)
@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_a_huge_body_is_a_json_413(api, world, method, url, caller, content_type):
    before = snapshot()
    url = url.format(workspace=world["workspace"].id, preset=world["preset"].id)

    response = _send(api, method, url, HUGE, content_type, world[caller])

    assert response.status_code == 413
    assert response.json()["error"] == "request_too_large"
    assert_safe(response, before)


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_a_huge_body_with_a_session_is_a_json_413(world, content_type):
    # Session requests go through the CSRF check, which reads form bodies first.
    client = Client(raise_request_exception=False)
    client.force_login(UserFactory())
    before = snapshot()

    response = client.generic("POST", "/api/v2/workspaces", data=HUGE, content_type=content_type)

    assert response.status_code == 413
    assert_safe(response, before)


@pytest.mark.parametrize(
    "body", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000]
)
def test_deeply_nested_json_is_a_400(api, world, body):
    before = snapshot()

    response = _send(api, "POST", "/api/v2/workspaces", body, "application/json", world["member"])

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_json"
    assert_safe(response, before)


# --- template files --------------------------------------------------------------------------

VALID_TEMPLATE = '''
name = "python-dev"
display_name = "Python development"
provisioner = "local"

[[parameters]]
name = "repo"
default = "https://example.invalid/repo.git"

[[agents]]
name = "main"
startup_script = """
echo "hello $WORKSPACE_OWNER"
"""

[[presets]]
name = "standard"
parameters = { repo = "https://example.invalid/repo.git" }
  [presets.prebuilds]
  instances = 3
  ttl_seconds = 28800
  timezone = "UTC"
  [[presets.prebuilds.schedule]]
  cron = "* 8-18 * * 1-5"
  instances = 5
'''

TOML_PIECES = [
    "name = ",
    "provisioner = ",
    "instances = ",
    "[[presets]]\n",
    "[presets.prebuilds]\n",
    "[[presets.prebuilds.schedule]]\n",
    "[[agents]]\n",
    "[[parameters]]\n",
    "[parameters]\n",
    "cron = ",
    "timezone = ",
    "ttl_seconds = ",
    "command = ",
    '"local"',
    '"command"',
    '"* * * * *"',
    '"Mars/Olympus"',
    "-1",
    "99999999999999999999",
    "9223372036854775807",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "inf",
    "nan",
    "true",
    "[1, 2]",
    "[[1], [2]]",
    "{ a = 1 }",
    '"\\u0000"',
    '"\\u202e"',
    '"🚀"',
    "= =",
    "\n",
    "[",
    "]",
    '"""',
    "#",
    "a.b.c = 1\n",
    "[" * 50,
    "a = " + "[" * 50 + "]" * 50,
    "a = " + "{ b = " * 50 + "1" + " }" * 50,
]


def _parse(text: str) -> None:
    try:
        parse_template(text)
    except TemplateFileError as exc:
        assert exc.messages and all(isinstance(message, str) for message in exc.messages)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(TOML_PIECES) | st.text(max_size=20), max_size=30).map("".join))
def test_toml_ish_documents_give_a_spec_or_a_template_file_error(text):
    _parse(text)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(VALID_TEMPLATE)),
            st.integers(min_value=0, max_value=40),
            st.sampled_from(TOML_PIECES) | st.text(max_size=10),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutations_of_a_valid_template_give_a_spec_or_a_template_file_error(edits):
    text = VALID_TEMPLATE
    for position, removed, inserted in edits:
        position = min(position, len(text))
        text = text[:position] + inserted + text[position + removed :]
    _parse(text)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["name", "provisioner", "agents", "presets", "parameters", "command"])
        | st.text(max_size=10),
        json_values,
        max_size=6,
    )
)
def test_documents_of_any_shape_give_a_spec_or_a_template_file_error(document):
    from workspaces.template_files import validate_document

    with contextlib.suppress(TemplateFileError):
        validate_document(document)


@pytest.mark.parametrize(
    "text",
    ["a = " + "[" * 5000 + "]" * 5000, "a = " + "{ b = " * 5000 + "1" + " }" * 5000],
)
def test_deeply_nested_toml_is_a_template_file_error(text):
    with pytest.raises(TemplateFileError):
        parse_template(text)


def _template_rows() -> tuple[int, int, int]:
    return (
        Template.objects.count(),
        TemplateVersion.objects.count(),
        TemplateVersionPreset.objects.count(),
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not toml at all [",
        VALID_TEMPLATE.replace('provisioner = "local"', 'provisioner = "docker"'),
        VALID_TEMPLATE.replace("instances = 3", "instances = -3"),
        VALID_TEMPLATE.replace('name = "standard"', 'name = "std\\u0000"'),
        VALID_TEMPLATE + '\n[[presets]]\nname = "standard"\n',
        VALID_TEMPLATE.replace('cron = "* 8-18 * * 1-5"', 'cron = "0 8 * * *"'),
    ],
)
def test_push_template_writes_nothing_for_a_bad_file(tmp_path, text):
    path = tmp_path / "template.toml"
    path.write_text(text)
    before = _template_rows()

    with pytest.raises(CommandError):
        call_command("push_template", str(path))

    assert _template_rows() == before


def test_push_template_accepts_the_valid_template(tmp_path):
    # The base of the mutations above is itself valid, so they test more than parse errors.
    path = tmp_path / "template.toml"
    path.write_text(VALID_TEMPLATE)
    before = _template_rows()

    call_command("push_template", str(path))

    assert _template_rows() == (before[0] + 1, before[1] + 1, before[2] + 1)


# --- NUL characters: text PostgreSQL cannot store is a 400 everywhere (config.nul_guard) -------


@pytest.fixture
def staff_client(world):
    client = Client(raise_request_exception=False)
    client.force_login(UserFactory(is_staff=True))
    return client


def assert_plain_400(response) -> None:
    assert response.status_code == 400, response.content[:300]
    assert response["Content-Type"].startswith("text/plain")
    assert b"NUL character" in response.content


@pytest.mark.parametrize(
    "url",
    [
        "/workspaces/?owner=%00",  # issue 12, observation 7: was a 500
        "/workspaces/?owner=dev%00&prebuilds=1",
        "/workspaces/?%00=1",
        "/prebuilds/workspaces/?owner=%00",
        "/prebuilds/?page=%00",
    ],
)
def test_a_nul_in_a_pages_query_string_is_a_plain_400(staff_client, url):
    assert_plain_400(staff_client.get(url))


def test_a_nul_in_a_form_post_is_a_plain_400_and_changes_nothing(staff_client, world):
    preset = world["preset"]
    before = snapshot()

    new = staff_client.post("/workspaces/new", {"name": "dev\x00", "template": "x"})
    size = staff_client.post(
        f"/prebuilds/presets/{preset.id}/desired-instances", {"instances": "1\x00"}
    )

    for response in (new, size):
        assert_plain_400(response)
    assert snapshot() == before
    assert TemplateVersionPreset.objects.get(id=preset.id).desired_instances is None


def test_a_nul_in_a_multipart_form_field_is_a_plain_400(staff_client, world):
    preset = world["preset"]
    body = (
        b'--BoUnDaRy\r\nContent-Disposition: form-data; name="instances"\r\n\r\n'
        b"2\x00\r\n--BoUnDaRy--\r\n"
    )

    response = staff_client.generic(
        "POST",
        f"/prebuilds/presets/{preset.id}/desired-instances",
        data=body,
        content_type="multipart/form-data; boundary=BoUnDaRy",
    )

    assert_plain_400(response)
    assert TemplateVersionPreset.objects.get(id=preset.id).desired_instances is None


@pytest.mark.parametrize(
    ("method", "url", "caller", "body"),
    [
        ("POST", "/api/v2/workspaces", "member", {"name": "dev\x00", "template_id": "{template}"}),
        ("POST", "/api/v2/workspaces", "member", {"name": "dev", "template_id\x00": "x"}),
        ("POST", "/api/v2/workspaces/{workspace}/builds", "member", {"transition": "stop\x00"}),
        ("PUT", "/api/v2/prebuilds/settings", "staff", {"reconciliation_paused": ["\x00"]}),
        ("PUT", "/api/v2/prebuilds/presets/{preset}", "staff", {"desired_instances\x00": 2}),
        ("POST", "/api/v2/workspaceagents/me/lifecycle", "agent", {"state": "ready\x00"}),
    ],
)
def test_a_nul_in_a_json_body_is_a_json_400_and_changes_nothing(
    api, world, method, url, caller, body
):
    preset = world["preset"]
    url = url.format(workspace=world["workspace"].id, preset=preset.id)
    body = json.loads(
        json.dumps(body).replace("{template}", str(preset.template_version.template_id))
    )
    before = snapshot()

    response = _send(api, method, url, _encoded(body), "application/json", world[caller])

    assert response.status_code == 400
    assert response.json() == {
        "error": "bad_request",
        "detail": "The JSON body contains a NUL character (\\x00), which cannot be stored.",
    }
    assert snapshot() == before


@pytest.mark.parametrize(
    ("url", "caller"),
    [
        ("/api/v2/workspaces/{workspace}?x=%00", "member"),
        ("/api/v2/templates?q=%00", "member"),
        ("/api/v2/prebuilds/status?%00", "staff"),
    ],
)
def test_a_nul_in_an_api_query_string_is_a_json_400(api, world, url, caller):
    url = url.format(workspace=world["workspace"].id)

    response = api.get(url, HTTP_AUTHORIZATION=world[caller])

    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


def test_an_escaped_backslash_before_u0000_is_not_a_nul(api, world):
    # The JSON text "\\u0000" is a backslash and "u0000": storable, so the view decides.
    body = b'{"transition": "\\\\u0000"}'
    url = f"/api/v2/workspaces/{world['workspace'].id}/builds"

    response = _send(api, "POST", url, body, "application/json", world["member"])

    assert response.status_code == 400
    assert response.json()["error"] != "bad_request"


def _asgi_send(method: str, url: str, token: str, body: Any = None):
    """One request through ``config.asgi.application`` (the served entry point)."""
    import asyncio

    import httpx

    from config.asgi import application

    async def run():
        transport = httpx.ASGITransport(app=application, client=("127.0.0.1", 40000))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
                return await http.request(method, url, json=body, headers={"Authorization": token})
        finally:
            await application.claim.aclose()

    return asyncio.run(run())


def test_an_async_view_refuses_a_nul_too(world):
    # The agents' reinit is an async view: the middleware's async branch answers it.
    response = _asgi_send("GET", "/api/v2/workspaceagents/me/reinit?wait=%00", world["agent"])

    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


@pytest.mark.django_db(transaction=True)
def test_the_claims_fast_path_leaves_a_nul_query_to_django():
    # The fast path would serve this claim (a fresh token, a ready prebuild) if it looked only
    # at the body; it hands the request to Django, which refuses it like any other.
    from django.utils import timezone

    from accounts.models import ApiToken
    from tests.workspaces.factories import prebuild

    preset = PresetFactory()
    pool = prebuild(preset)
    user = UserFactory()
    token = api_token_create(user=user)
    ApiToken.objects.filter(user=user).update(last_used_at=timezone.now())
    body = {"name": "dev", "template_version_preset_id": str(preset.id)}

    response = _asgi_send("POST", "/api/v2/workspaces?x=%00", f"Bearer {token}", body)

    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    assert Workspace.objects.get(id=pool.id).owner_id != user.id
    assert PrebuildClaim.objects.count() == 0
