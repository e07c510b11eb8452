"""Infrastructure failures are not template failures (issue 12), with real processes.

Each scenario runs on its own PostgreSQL and Redis (``tests.operations.cluster``), states the
expectation it checks in its docstring, and bounds every wait.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.operations.cluster import Cluster, pid_alive, wait_until

pytestmark = pytest.mark.slow

INSTANCES = 3


def gated_template(gate: str) -> str:
    """A ``local`` template with one preset of ``INSTANCES`` prebuilds whose agent's startup
    script waits while the file ``gate`` exists: builds can be caught mid-build at will."""
    return f'''
name = "gated"
provisioner = "local"

[[agents]]
name = "main"
startup_script = """
while [ -e "{gate}" ]; do sleep 0.2; done
echo "ready for $WORKSPACE_OWNER"
"""

[[presets]]
name = "only"
  [presets.prebuilds]
  instances = {INSTANCES}
'''


def push(cluster: Cluster, text: str) -> str:
    """Push a template file; answer the id of its (only) preset."""
    path = cluster.root / "gated.toml"
    path.write_text(text)
    output = cluster.shell(
        f"""
        import io, json
        from django.core.management import call_command
        from workspaces.models import Template

        call_command("push_template", {str(path)!r}, stdout=io.StringIO())
        preset = Template.objects.get(name="gated").active_version.presets.get()
        print(json.dumps(str(preset.id)))
        """
    )
    return json.loads(output.strip().splitlines()[-1])


def test_three_lost_workers_in_a_row_neither_back_off_nor_hard_limit_and_the_pool_refills(
    cluster: Cluster,
):
    """Expectation: a prefork worker (child processes, as `make run` starts it) runs the three
    prebuild start builds of a preset, their agents held in their startup scripts. SIGKILL of
    the three child processes running them leaves the jobs without heartbeats; the stale sweep
    (beat, every 15 s) fails them as `infrastructure` failures ("Worker lost"). With the hard
    limit at 3 and a 60 s back-off interval, counting them as template failures would
    hard-limit the preset and hold creation; instead the preset stays `healthy`, no `backoff`
    action appears, the status document says the three failures were `infrastructure`, the
    failed builds' agents are stopped on their host (directory, build log and agent log kept),
    and the pool refills to three eligible prebuilds.
    """
    cluster.overrides.update(PREBUILDS_BACKOFF_INTERVAL="60", PREBUILDS_FAILURE_HARD_LIMIT="3")
    gate = cluster.root / "gate"
    gate.touch()
    preset = push(cluster, gated_template(str(gate)))
    cluster.web("web1")
    worker = cluster.worker("worker1", pool="prefork", concurrency=INSTANCES + 1)
    cluster.beat("beat1")

    def held_builds() -> list[tuple]:
        return cluster.query(
            "SELECT j.id, j.worker, b.workspace_id FROM workspaces_provisionerjob j "
            "JOIN workspaces_workspacebuild b ON b.job_id = j.id "
            "WHERE b.preset_id = %s AND j.status = 'running' AND j.logs LIKE %s",
            (preset, "%agent main: starting%"),
        )

    held = wait_until(
        lambda: len(rows := held_builds()) == INSTANCES and rows,
        90,
        what="three builds waiting for their agents' startup scripts",
        diagnose=cluster.diagnose,
    )
    children = {int(identity.rpartition(":")[2]) for _, identity, _ in held}
    assert len(children) == INSTANCES and worker.pid not in children, (children, worker.pid)
    job_ids = [job_id for job_id, _, _ in held]
    workspaces = [str(workspace_id) for _, _, workspace_id in held]
    agent_pids = {
        workspace: int(
            (cluster.data_dir / "workspaces" / workspace / ".warmstart/agent-main.pid").read_text()
        )
        for workspace in workspaces
    }
    assert all(pid_alive(pid) for pid in agent_pids.values())

    killed_at = time.monotonic()
    for child in children:
        os.kill(child, signal.SIGKILL)
    gate.unlink()  # replacements need not wait; the orphaned agents would now become ready

    def lost() -> list[tuple]:
        rows = cluster.query(
            "SELECT status, failure_kind, error FROM workspaces_provisionerjob WHERE id = ANY(%s)",
            (job_ids,),
        )
        return all(status == "failed" for status, _, _ in rows) and rows

    failed = wait_until(lost, 60, what="the sweep to fail the lost jobs", diagnose=cluster.diagnose)
    failed_after = time.monotonic() - killed_at
    assert {(kind, error) for _, kind, error in failed} == {
        ("infrastructure", "Worker lost (heartbeat timeout).")
    }

    wait_until(
        lambda: cluster.eligible_counts().get(preset, 0) >= INSTANCES,
        90,
        what="the pool to refill",
        diagnose=cluster.diagnose,
    )
    refilled_after = time.monotonic() - killed_at

    assert cluster.query(
        "SELECT prebuild_status FROM workspaces_templateversionpreset WHERE id = %s", (preset,)
    ) == [("healthy",)]
    [document] = [p for p in cluster.dry_run()["presets"] if p["preset_id"] == preset]
    assert document["status"] == "healthy"
    assert not [a for a in document["actions"] if a["type"] == "backoff"], document
    assert document["failures"] == {"template": 0, "infrastructure": INSTANCES}, document
    assert document["last_failure"]["kind"] == "infrastructure"
    assert worker.running(), worker.tail()

    # The lost builds' agents were stopped on their host; their evidence stays.
    wait_until(
        lambda: not any(pid_alive(pid) for pid in agent_pids.values()),
        30,
        what="the failed prebuilds' agents to be stopped",
        diagnose=cluster.diagnose,
    )
    logs = dict(
        cluster.query(
            "SELECT id::text, logs FROM workspaces_provisionerjob WHERE id = ANY(%s)", (job_ids,)
        )
    )
    for job_id, workspace in zip(job_ids, workspaces, strict=True):
        assert "stopping the processes of this failed prebuild" in logs[str(job_id)]
        state = cluster.data_dir / "workspaces" / workspace / ".warmstart"
        assert (state / "agent-main.log").is_file()
    assert cluster.query(
        "SELECT count(*) FROM workspaces_workspace WHERE id = ANY(%s::uuid[]) AND NOT deleted",
        (workspaces,),
    ) == [(INSTANCES,)]
    print(  # noqa: T201 - the measured recovery, for the README's Reliability section
        f"\nlost workers: jobs failed after {failed_after:.1f} s, "
        f"pool refilled after {refilled_after:.1f} s"
    )
