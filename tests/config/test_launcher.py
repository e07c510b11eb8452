"""The launcher's supervision of its children (``config.launcher.Child``), with real processes
and the clock passed in (no waiting on back-off delays)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from config.launcher import RESTART_DELAYS, STABLE_AFTER, Child, ProcessSpec, process_specs
from tests.operations.cluster import pid_alive, wait_until
from workspaces import routing


def _crashing(tmp_path: Path) -> Child:
    """A child that starts a grandchild in its process group, then exits with status 3."""
    script = f"sleep 60 & echo $! >> {tmp_path / 'grandchildren'}; exit 3"
    return Child(ProcessSpec("crasher", ["sh", "-c", script]), dict(os.environ))


def _exited(child: Child) -> None:
    child.popen.wait(30)


def test_a_crashing_child_is_restarted_with_growing_delays_and_its_group_cleaned_up(
    tmp_path, capsys
):
    child = _crashing(tmp_path)
    child.start(now=1000.0)
    first = child.popen.pid
    _exited(child)

    child.check(now=1001.0)
    assert child.restart_at == 1001.0 + RESTART_DELAYS[0]
    assert f"crasher (pid {first}) exited with status 3; restart #1 in 0.5 s" in (
        capsys.readouterr().out
    )
    # What the crashed process left in its group is gone (a killed worker's pool processes).
    grandchild = int((tmp_path / "grandchildren").read_text().split()[0])
    wait_until(lambda: not pid_alive(grandchild), 10, what="the grandchild to be killed")

    child.check(now=1001.4)
    assert child.popen.pid == first  # not yet
    child.check(now=1001.5)
    assert child.popen.pid != first
    assert "crasher restarted" in capsys.readouterr().out

    # Crashing again at once: the delay grows (1 s, then 2 s).
    for expected in RESTART_DELAYS[1:3]:
        _exited(child)
        child.check(now=child.started_at + 1)
        assert child.restart_at == child.started_at + 1 + expected
        child.check(now=child.restart_at)

    # A crash after a stable run starts the back-off over.
    _exited(child)
    child.check(now=child.started_at + STABLE_AFTER)
    assert child.crashes == 1
    assert child.restart_at == child.started_at + STABLE_AFTER + RESTART_DELAYS[0]
    child.terminate()


def test_stopping_a_child_kills_what_it_left_in_its_group(tmp_path):
    child = Child(
        ProcessSpec(
            "stubborn",
            ["sh", "-c", f"sleep 60 & echo $! > {tmp_path / 'pid'}; trap '' TERM; sleep 60"],
        ),
        dict(os.environ),
    )
    child.start(now=0.0)
    wait_until(lambda: (tmp_path / "pid").exists(), 10, what="the child to start")
    grandchild = int((tmp_path / "pid").read_text())

    child.terminate()
    child.wait_stopped(deadline=0)  # past: it ignores SIGTERM, so its group is killed

    assert child.popen.poll() is not None
    wait_until(lambda: not pid_alive(grandchild), 10, what="the grandchild to be killed")


def test_the_process_table_is_web_workers_by_role_and_beat():
    env = {"PORT": "8123", "DATA_DIR": "/tmp/warmstart-data"}
    specs = process_specs(env)

    assert [spec.name for spec in specs] == [
        "web",
        "worker",
        "claim-worker",
        "prebuild-worker",
        "control",
        "beat",
    ]
    assert all(spec.command[0] == sys.executable for spec in specs)
    assert "8123" in specs[0].command
    # The role workers serve exactly their role's queues (a claim never waits behind a fill).
    by_name = {spec.name: spec for spec in specs}
    for name, role in (("prebuild-worker", "prebuilds"), ("control", "control")):
        assert queues_of(by_name[name]) == routing.worker_queues(role)


def queues_of(spec) -> list[str]:
    return spec.command[spec.command.index("--queues") + 1].split(",")


def test_a_worker_no_cold_build_can_occupy_serves_this_hosts_claim_builds():
    """A claim build of a local prebuild goes to this host's people's queue; the people's
    worker also takes cold builds (the misses of a dry pool), so a second worker consumes that
    queue alone and always has a thread for the claim."""
    specs = {spec.name: spec for spec in process_specs({"PORT": "8123", "DATA_DIR": "/tmp/d"})}
    claim_build = routing.build_queue(host_queue=routing.host_queue(), prebuild=False)

    assert queues_of(specs["claim-worker"]) == [claim_build]
    assert routing.DEFAULT_QUEUE in queues_of(specs["worker"])  # where cold builds go
    assert routing.DEFAULT_QUEUE not in queues_of(specs["claim-worker"])
