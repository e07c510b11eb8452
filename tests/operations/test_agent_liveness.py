"""A prebuild whose agent is gone stops being claimable, is never handed out, and is replaced.

Real processes on the scenario's own PostgreSQL and Redis (``tests.operations.cluster``): a web
process, a worker, the reconciler as ``reconcile_prebuilds --loop``, and the agents the worker
starts. ``AGENT_DISCONNECT_TIMEOUT`` is 4 s here (so the grace period is 4 s too).
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.operations.cluster import Cluster, wait_until

pytestmark = pytest.mark.slow

TIMEOUT = 4.0


def _claimable(cluster: Cluster, preset: str) -> int:
    return cluster.eligible_counts().get(preset, 0)


def _agent_pid(cluster: Cluster, workspace_id: str) -> int:
    pid_file = cluster.data_dir / "workspaces" / workspace_id / ".warmstart/agent-main.pid"
    return int(pid_file.read_text())


def _preset_document(cluster: Cluster, preset: str) -> dict:
    [document] = [p for p in cluster.dry_run()["presets"] if p["preset_id"] == preset]
    return document


@pytest.mark.parametrize(
    ("signum", "reason"),
    [(signal.SIGKILL, "agent_disconnected"), (signal.SIGTERM, "agent_off")],
    ids=["sigkill", "sigterm"],
)
def test_a_prebuild_whose_agent_dies_stops_being_claimable_and_is_replaced(
    cluster: Cluster, signum: int, reason: str
):
    """Expectation: after its agent is SIGKILLed (it just stops answering) or SIGTERMed (it
    reports `off`), the prebuild stops being claimable within AGENT_DISCONNECT_TIMEOUT + 5 s;
    a claim made then never returns it (the user gets a cold build); the status document
    counts it `unhealthy` with a delete of reason `unhealthy` once the grace period passed;
    and the reconciler deletes it and brings the pool back to its size, logging why.
    """
    cluster.overrides["AGENT_DISCONNECT_TIMEOUT"] = str(TIMEOUT)
    setup = cluster.setup(slow_step=0.5, users=1, instances=1)
    web = cluster.web("web1")
    cluster.worker("worker1")
    loop = cluster.reconcile_loop("loop1")
    preset = setup.presets[0]
    wait_until(
        lambda: cluster.pools_full(setup.presets, 1),
        90,
        what="pools full",
        diagnose=cluster.diagnose,
    )
    # The reconciler waits while we look at the status document in the grace period.
    loop.sigterm()
    assert loop.wait(20) == 0, loop.tail()
    [(doomed,)] = cluster.query(
        "SELECT w.id::text FROM workspaces_workspace w "
        "JOIN workspaces_workspacebuild b ON b.workspace_id = w.id "
        "WHERE w.owner_id = %s AND NOT w.deleted AND b.preset_id = %s",
        ("c42fdf75-3097-471c-8c33-fb52454d81c0", preset),
    )

    os.kill(_agent_pid(cluster, doomed), signum)
    killed = time.monotonic()
    wait_until(
        lambda: _claimable(cluster, preset) == 0,
        TIMEOUT + 5,
        interval=0.1,
        what="the prebuild to stop being claimable",
        diagnose=cluster.diagnose,
    )
    unclaimable_after = time.monotonic() - killed

    user = setup.users[0]
    answer = httpx.post(
        web.url + "/api/v2/workspaces",
        json={"name": "dev", "template_version_preset_id": preset},
        headers={"Authorization": f"Bearer {user['token']}"},
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["id"] != doomed
    assert answer.json()["claimed_prebuild"] is False
    [(owner,)] = cluster.query(
        "SELECT owner_id::text FROM workspaces_workspace WHERE id = %s", (doomed,)
    )
    assert owner == "c42fdf75-3097-471c-8c33-fb52454d81c0"

    def reported_unhealthy() -> bool:
        document = _preset_document(cluster, preset)
        return (
            document["state"]["unhealthy"] == 1
            and {
                "type": "delete",
                "workspace_ids": [doomed],
                "reason": "unhealthy",
            }
            in document["actions"]
        )

    wait_until(
        reported_unhealthy,
        2 * TIMEOUT + 10,
        what="the status to report it unhealthy",
        diagnose=cluster.diagnose,
    )
    document = _preset_document(cluster, preset)
    assert (document["status"], document["state"]["actual"], document["state"]["eligible"]) == (
        "healthy",
        0,
        0,
    )
    assert {"type": "create", "count": 1, "reason": "below_desired"} in document["actions"]

    loop = cluster.reconcile_loop("loop2")
    wait_until(
        lambda: cluster.pools_full(setup.presets, 1),
        90,
        what="the pool refilled",
        diagnose=cluster.diagnose,
    )
    refilled_after = time.monotonic() - killed
    [(latest,)] = cluster.query(
        "SELECT b.transition FROM workspaces_workspacebuild b WHERE b.workspace_id = %s "
        "ORDER BY b.build_number DESC LIMIT 1",
        (doomed,),
    )
    assert latest == "delete"
    assert f"unhealthy={doomed}:{reason}" in loop.log()
    document = _preset_document(cluster, preset)
    assert document["state"]["unhealthy"] == 0
    assert document["state"]["eligible"] == document["state"]["desired"] == 1
    print(
        f"\n{signal.Signals(signum).name}: not claimable after {unclaimable_after:.1f} s, "
        f"pool refilled after {refilled_after:.1f} s"
    )
