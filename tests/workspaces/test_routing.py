"""Queues by role (``workspaces.routing``): people's builds never share a queue with the pool's."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

import pytest
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID
from prebuilds.claims import claim_prebuild
from prebuilds.reconciler import prebuild_delete, reconcile
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import JobFactory, PresetFactory, TemplateFactory, prebuild
from tests.workspaces.factories import system_user as the_system_user
from workspaces import jobs, routing
from workspaces.creation import workspace_request
from workspaces.models import JobStatus, Transition, Workspace, WorkspaceBuild
from workspaces.services import build_create

HOST = routing.host_queue("builder-7")


def latest(workspace: Workspace) -> WorkspaceBuild:
    return workspace.builds.select_related("job").order_by("-build_number").first()


def test_the_roles_queues_are_disjoint_and_all_is_their_union():
    builds, prebuilds, control = (
        routing.worker_queues(r) for r in ("builds", "prebuilds", "control")
    )

    assert builds == [routing.DEFAULT_QUEUE, routing.host_queue()]
    assert prebuilds == [routing.PREBUILDS_QUEUE, routing.host_queue() + ".prebuilds"]
    assert control == [routing.CONTROL_QUEUE]
    assert not (set(builds) & set(prebuilds) or set(builds) & set(control))
    assert routing.worker_queues() == [*builds, *prebuilds, *control]


def test_a_per_host_queue_names_its_host_whatever_its_role():
    assert routing.queue_host("host.a.example.com") == "a.example.com"
    assert routing.queue_host("host.a.example.com.prebuilds") == "a.example.com"
    assert routing.queue_host(routing.PREBUILDS_QUEUE) is None


@pytest.mark.django_db
class TestBuildQueues:
    def test_the_pool_fills_on_the_prebuild_queue_and_people_build_on_theirs(self):
        preset = PresetFactory(desired_instances=1)
        reconcile()
        [filled] = Workspace.objects.filter(owner_id=SYSTEM_USER_ID)

        cold = workspace_request(
            user=UserFactory(), name="dev", template=preset.template_version.template
        )

        assert latest(filled).job.queue == routing.PREBUILDS_QUEUE
        assert latest(cold).job.queue == routing.DEFAULT_QUEUE

    def test_a_local_prebuilds_later_builds_stay_on_its_host_in_their_role(self):
        preset = PresetFactory(desired_instances=2)  # local provisioner
        deleted, claimed = prebuild(preset), prebuild(preset)
        Workspace.objects.filter(id__in=[deleted.id, claimed.id]).update(host_queue=HOST)

        assert prebuild_delete(workspace_id=deleted.id, owner=the_system_user())
        alice = UserFactory()
        workspace = claim_prebuild(alice, preset, "dev")
        assert workspace is not None and workspace.id == claimed.id

        assert latest(deleted).job.queue == HOST + ".prebuilds"  # the pool's, on that host
        assert latest(claimed).job.queue == HOST  # the claim is a person's build
        jobs.job_cancel(latest(claimed).job_id)  # so the owner may build again
        stop = build_create(workspace=workspace, transition=Transition.STOP, initiator=alice)
        assert stop.job.queue == HOST

    def test_command_builds_run_anywhere_in_their_role(self):
        template = TemplateFactory(with_version__provisioner="command")
        preset = PresetFactory(template_version=template.active_version, desired_instances=1)
        pool = prebuild(preset)
        Workspace.objects.filter(id=pool.id).update(host_queue=HOST)  # ignored: not local

        assert prebuild_delete(workspace_id=pool.id, owner=the_system_user())

        assert latest(pool).job.queue == routing.PREBUILDS_QUEUE

    def test_a_pending_prebuild_build_for_a_gone_host_fails_naming_the_host(self, settings):
        settings.PROVISIONER_HOST_QUEUE_TIMEOUT = 600
        host = f"gone-{uuid4().hex[:8]}"
        queue = routing.build_queue(host_queue=routing.host_queue(host), prebuild=True)
        job = JobFactory(queue=queue, created_at=timezone.now() - timedelta(minutes=11))

        assert jobs.jobs_fail_unserved_host_jobs(timeout=timedelta(minutes=10)) == [job.id]

        job.refresh_from_db()
        assert job.status == JobStatus.FAILED
        assert job.error == f"Worker host {host!r} unavailable."
