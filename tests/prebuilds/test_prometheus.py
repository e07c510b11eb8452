"""`/metrics` as Prometheus sees it, and the files of docs/prometheus/, checked by promtool.

A real uvicorn server on the test database is scraped with the bearer token, as the shipped
scrape configuration does; promtool (Debian's prometheus package, `make promtool`) lints the
scrape, the rules and the configuration, and runs the rules' unit tests.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from django.utils import timezone

from accounts.models import ApiToken
from accounts.services import api_token_create
from prebuilds.reconciler import reconcile
from tests.accounts.factories import UserFactory
from tests.prebuilds.test_metrics import samples
from tests.processes import ROOT, asgi_server, free_port
from tests.workspaces.factories import PresetFactory, prebuild

pytestmark = pytest.mark.django_db(transaction=True)

DOCS = Path(ROOT) / "docs" / "prometheus"
TOKEN = "scrape-token-for-tests"


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    assert path, "promtool is missing: run `make promtool` (Debian's prometheus package)"
    return subprocess.run([path, *args], input=stdin, capture_output=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock(), asgi_server(METRICS_TOKEN=TOKEN) as url:
        yield url


def scrape(server: str) -> httpx.Response:
    response = httpx.get(
        f"{server}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    assert response.status_code == 200
    return response


def _claim_through_the_fast_path(server: str) -> None:
    """A claim answered 201 by the ASGI fast path (a fresh token, an eligible prebuild)."""
    preset = PresetFactory(desired_instances=1)
    prebuild(preset)
    alice = UserFactory()
    token = api_token_create(user=alice)
    ApiToken.objects.filter(user=alice).update(last_used_at=timezone.now())
    response = httpx.post(
        f"{server}/api/v2/workspaces",
        json={"name": "dev", "template_version_preset_id": str(preset.id)},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert response.status_code == 201, response.text


def test_a_live_scrape_passes_promtool_check_metrics(server):
    preset = PresetFactory(desired_instances=2)
    prebuild(preset)
    reconcile()
    httpx.get(f"{server}/login/", timeout=30)

    body = scrape(server).content
    result = promtool("check", "metrics", stdin=body)

    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "", "promtool lint findings"
    text = body.decode()
    assert "prebuilds_reconciliation_duration_seconds_count " in text
    assert "coderd_prebuilt_workspaces_desired{" in text


def test_http_requests_are_counted_by_route_on_every_path(server):
    before = samples(scrape(server).text)
    _claim_through_the_fast_path(server)  # the fast path on the event loop
    httpx.get(f"{server}/login/", timeout=30)  # a sync view (WSGI thread pool)
    workspace = uuid.uuid4()
    httpx.get(f"{server}/api/v2/workspaces/{workspace}", timeout=30)  # 401, id in the path
    httpx.get(f"{server}/wp-admin/{uuid.uuid4()}.php", timeout=30)  # a scanner's 404
    httpx.get(f"{server}/api/v2/workspaceagents/me/reinit", timeout=30)  # async view, 401

    after = samples(scrape(server).text)

    def grew(route: str, method: str, status: str) -> float:
        key = (
            "warmstart_http_requests_total",
            frozenset({("route", route), ("method", method), ("status", status)}),
        )
        return after.get(key, 0) - before.get(key, 0)

    assert grew("/api/v2/workspaces", "POST", "201") == 1
    assert grew("/login/", "GET", "200") == 1
    assert grew("/api/v2/workspaces/<str:workspace_id>", "GET", "401") == 1
    assert grew("unmatched", "GET", "404") == 1
    assert grew("/api/v2/workspaceagents/me/reinit", "GET", "401") == 1
    names = {name for name, _ in after}
    assert not any(str(workspace) in str(labels) for _, labels in after), "ids are not labels"
    count = (
        "warmstart_http_request_duration_seconds_count",
        frozenset({("route", "/api/v2/workspaces"), ("method", "POST")}),
    )
    assert after[count] - before.get(count, 0) == 1
    assert {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_info",
    } <= names


def test_the_grafana_dashboard_queries_only_metrics_that_exist(server):
    preset = PresetFactory(desired_instances=1)
    prebuild(preset)
    reconcile()
    _claim_through_the_fast_path(server)
    exposed = {name for name, _ in samples(scrape(server).text)}
    recorded = set(re.findall(r"record: (\S+)", (DOCS / "alerts.yml").read_text()))

    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", target["expr"])
    }

    assert queried, "the dashboard has queries"
    assert queried - exposed - recorded == set()


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests():
    checked = promtool("check", "rules", str(DOCS / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()

    tested = promtool("test", "rules", str(DOCS / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout.decode() + tested.stderr.decode()


def test_the_scrape_configuration_passes_promtool_check_config(tmp_path):
    # The shipped file points at /etc/prometheus/...; promtool checks that the credentials
    # file exists, so check a copy that points at one made here.
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = (DOCS / "prometheus.yml").read_text()
    assert "credentials_file: /etc/prometheus/warmstart_metrics_token" in config
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/warmstart_metrics_token", str(token_file))
    )
    shutil.copy(DOCS / "alerts.yml", tmp_path / "alerts.yml")

    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))

    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def _query(base: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_a_real_prometheus_scrapes_with_the_shipped_configuration(server, tmp_path):
    """Debian's Prometheus server, run with the shipped files, scrapes and evaluates the rules."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: run `make promtool` (Debian's prometheus package)"
    preset = PresetFactory(desired_instances=2)
    prebuild(preset)
    reconcile()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    # The shipped configuration, pointed at the test server and scraping every second.
    config = (
        (DOCS / "prometheus.yml")
        .read_text()
        .replace("/etc/prometheus/warmstart_metrics_token", str(token_file))
        .replace("127.0.0.1:8000", server.removeprefix("http://"))
        .replace("scrape_interval: 30s", "scrape_interval: 1s")
        .replace("evaluation_interval: 30s", "evaluation_interval: 1s")
    )
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(DOCS / "alerts.yml", tmp_path / "alerts.yml")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        up: list[dict] = []
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                up = _query(base, 'up{job="warmstart"}')
            except (httpx.TransportError, ValueError):  # not listening, or still starting (503)
                up = []
            if up and _query(base, "prebuilds_reconciliation_duration_seconds_count"):
                break
            time.sleep(0.5)

        assert [sample["value"][1] for sample in up] == ["1"], "scraped with the bearer token"
        names = _query(base, "coderd_prebuilt_workspaces_desired")
        assert names, "Coder's names are scraped"
        assert {"organization_name", "template_name", "preset_name"} <= set(names[0]["metric"])
        assert _query(base, "process_resident_memory_bytes")
        evaluated: list[dict] = []
        while time.monotonic() < deadline:
            groups = httpx.get(f"{base}/api/v1/rules", timeout=10).json()["data"]["groups"]
            evaluated = [rule for group in groups for rule in group["rules"]]
            if all(rule["health"] != "unknown" for rule in evaluated):
                break
            time.sleep(0.5)
        assert len(evaluated) == 11
        assert {r["name"]: r["health"] for r in evaluated if r["health"] != "ok"} == {}
    finally:
        process.terminate()
        process.wait(timeout=30)
