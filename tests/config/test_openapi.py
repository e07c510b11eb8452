"""The OpenAPI document (``config.openapi``): complete, served, and true — Schemathesis runs
every operation of it (positive and negative cases) against a real server."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest
from django.test import Client
from django.urls import URLPattern, get_resolver

from accounts.services import api_token_create
from config.openapi import document
from tests.accounts.factories import UserFactory
from tests.processes import asgi_server
from tests.workspaces.factories import (
    AgentFactory,
    BuildFactory,
    PresetFactory,
    WorkspaceFactory,
    prebuild,
)

pytestmark = pytest.mark.django_db

# Per operation: a handful of cases per phase keeps the whole run near a minute on 2 cores.
MAX_EXAMPLES = 25


def _routes(patterns, prefix=""):
    for pattern in patterns:
        if isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern)
        else:
            yield from _routes(pattern.url_patterns, prefix + str(pattern.pattern))


def test_every_api_route_is_documented_and_nothing_else():
    routes = {
        "/" + re.sub(r"<(?:str:)?([a-z_]+)>", r"{\1}", route)
        for route in _routes(get_resolver().url_patterns)
        if route.startswith("api/v2/")
    }

    assert routes == set(document()["paths"])


def test_every_operation_has_a_unique_id():
    ids = [op["operationId"] for item in document()["paths"].values() for op in item.values()]

    assert len(ids) == len(set(ids)) == sum(len(item) for item in document()["paths"].values())


def test_the_document_is_public_json():
    response = Client().get("/api/v2/openapi.json")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json()["openapi"].startswith("3.1")


def test_the_people_page_renders_it_with_local_files_only():
    response = Client().get("/api/docs/")

    page = response.content.decode()
    assert response.status_code == 200
    assert "/api/v2/openapi.json" in page
    assert "/static/js/apidocs.js" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "nothing from elsewhere"


def test_the_sse_event_name_is_documented():
    reinit = document()["paths"]["/api/v2/workspaceagents/me/reinit"]["get"]

    assert "text/event-stream" in reinit["responses"]["200"]["content"]
    assert 'addEventListener("data"' in reinit["description"]


@pytest.mark.django_db(transaction=True)
def test_schemathesis_finds_nothing_wrong(tmp_path):
    """Every operation, every check, positive and negative cases, against uvicorn.

    The reinit endpoint is called with a second agent that was last initialised for another
    owner, so it always has a reinit due and answers at once, whatever ``wait`` (a waiting
    agent would make the run last minutes). One adjustment: the listing may answer 400 to a
    "valid" cursor, because a cursor is opaque: one the server did not hand out is refused,
    and no schema can say which strings it handed out.
    """
    staff = UserFactory(username="operator", is_staff=True)
    preset = PresetFactory(desired_instances=1)
    workspace = WorkspaceFactory(owner=staff, template=preset.template_version.template)
    agent = AgentFactory(build=BuildFactory(workspace=workspace, preset=preset))
    due = AgentFactory(
        build=BuildFactory(workspace=WorkspaceFactory(owner=staff), preset=preset),
        initialized_owner=UserFactory(),
    )
    prebuild(preset)
    staff_token = api_token_create(user=staff)
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        f"""
[generation]
max-examples = {MAX_EXAMPLES}

[[operations]]
include-path-regex = "^/api/v2/workspaceagents/me/(manifest|lifecycle|heartbeat)$"
headers = {{ Authorization = "Bearer {agent.plain_token}" }}

[[operations]]
include-path = "/api/v2/workspaceagents/me/reinit"
headers = {{ Authorization = "Bearer {due.plain_token}" }}

[[operations]]
include-path = "/api/v2/workspaces"
include-method = "GET"
headers = {{ Authorization = "Bearer {staff_token}" }}
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "400", "401", "403", "404", "409", "429"
]

[[operations]]
include-path-regex = "^/api/v2/prebuilds/presets/"
headers = {{ Authorization = "Bearer {staff_token}" }}
parameters = {{ preset_id = "{preset.id}" }}

[[operations]]
include-path-regex = "^/api/v2/workspaces/[{{]"
headers = {{ Authorization = "Bearer {staff_token}" }}
parameters = {{ workspace_id = "{workspace.id}" }}

# Last: the entries above are more specific (the first match decides).
[[operations]]
include-path-regex = "^/api/v2/(users|templates|workspaces|prebuilds)"
headers = {{ Authorization = "Bearer {staff_token}" }}
"""
    )
    with asgi_server() as url:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(config),
                "run",
                f"{url}/api/v2/openapi.json",
                "--checks",
                "all",
                "--mode",
                "all",
                "--workers",
                "1",
                "--request-timeout",
                "20",
                "--seed",
                "3",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        # Sanity: the run's bearer token is real (the run is not all 401s).
        me = httpx.get(f"{url}/api/v2/users/me", headers={"Authorization": f"Bearer {staff_token}"})
        assert me.json()["username"] == "operator"

    (tmp_path / "schemathesis.out").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert re.search(r"\d+ generated, \d+ passed", run.stdout), run.stdout[-3000:]
