from __future__ import annotations

import threading

import pytest
from django.db import connection

from tests.accounts.factories import UserFactory
from tests.workspaces.factories import (
    AgentFactory,
    BuildFactory,
    PresetFactory,
    TemplateFactory,
    WorkspaceFactory,
    prebuild,
)
from workspaces.models import JobStatus, Workspace, WorkspaceBuild
from workspaces.services import (
    WorkspaceConflict,
    WorkspaceError,
    agent_authenticate,
    agents_retire,
    build_create,
    workspace_create,
)

pytestmark = pytest.mark.django_db


def test_it_creates_a_workspace_with_a_pending_start_build():
    template = TemplateFactory()
    preset = PresetFactory(template_version=template.active_version, parameters={"repo": "r"})
    alice = UserFactory()

    workspace = workspace_create(owner=alice, template=template, name="dev", preset=preset)

    build = workspace.builds.get()
    assert (build.build_number, build.transition, build.job.status) == (1, "start", "pending")
    assert build.initiator == alice
    assert build.preset == preset
    assert build.parameters == {"repo": "r"}


@pytest.mark.parametrize("name", ["", "Dev", "-dev", "dev-", "a" * 65, "dev space", None, 12])
def test_it_refuses_a_bad_name_and_writes_nothing(name):
    with pytest.raises(WorkspaceError, match="name:"):
        workspace_create(owner=UserFactory(), template=TemplateFactory(), name=name)

    assert not Workspace.objects.exists()


def test_it_refuses_a_taken_name_and_writes_nothing():
    alice = UserFactory()
    template = TemplateFactory()
    workspace_create(owner=alice, template=template, name="dev")

    with pytest.raises(WorkspaceConflict, match="already have"):
        workspace_create(owner=alice, template=template, name="dev")

    assert Workspace.objects.count() == 1
    assert WorkspaceBuild.objects.count() == 1


def test_it_allows_the_same_name_for_another_owner_or_after_deletion():
    template = TemplateFactory()
    alice = UserFactory()
    first = workspace_create(owner=alice, template=template, name="dev")
    Workspace.objects.filter(id=first.id).update(deleted=True)

    workspace_create(owner=alice, template=template, name="dev")
    workspace_create(owner=UserFactory(), template=template, name="dev")

    assert Workspace.objects.filter(name="dev").count() == 3


def test_it_refuses_a_preset_of_another_version():
    template = TemplateFactory()
    other = PresetFactory()

    with pytest.raises(WorkspaceError, match="template_version_preset_id"):
        workspace_create(owner=UserFactory(), template=template, name="dev", preset=other)


def test_it_refuses_a_new_build_while_one_is_active():
    build = BuildFactory(job__status=JobStatus.RUNNING)

    with pytest.raises(WorkspaceConflict, match="still running"):
        build_create(workspace=build.workspace, transition="stop", initiator=build.initiator)


def test_it_numbers_builds_and_reuses_version_and_preset():
    preset = PresetFactory()
    workspace = WorkspaceFactory(template=preset.template_version.template)
    BuildFactory(workspace=workspace, preset=preset)

    build = build_create(workspace=workspace, transition="stop", initiator=workspace.owner)

    assert build.build_number == 2
    assert build.preset == preset
    assert build.template_version == preset.template_version


def test_it_refuses_builds_of_a_deleted_workspace():
    workspace = WorkspaceFactory(deleted=True)

    with pytest.raises(WorkspaceConflict):
        build_create(workspace=workspace, transition="start", initiator=workspace.owner)


@pytest.mark.django_db(transaction=True)
def test_two_racing_builds_never_both_win():
    build = BuildFactory()
    workspace, owner = build.workspace, build.initiator
    results: list[str] = []
    barrier = threading.Barrier(4)

    def attempt():
        barrier.wait()
        try:
            build_create(workspace=workspace, transition="stop", initiator=owner)
            results.append("ok")
        except WorkspaceConflict:
            results.append("conflict")
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(results) == ["conflict"] * 3 + ["ok"]
    assert list(
        workspace.builds.values_list("build_number", flat=True).order_by("build_number")
    ) == [1, 2]


def test_agent_tokens_authenticate_current_agents_only():
    agent = AgentFactory()

    assert agent_authenticate(agent.plain_token) == agent
    assert agent_authenticate(agent.plain_token + "x") is None
    assert agent_authenticate("wsa_nope_nope") is None

    agents_retire(workspace=agent.workspace)

    assert agent_authenticate(agent.plain_token) is None


def test_the_prebuild_factory_makes_an_eligible_prebuild():
    preset = PresetFactory()

    workspace = prebuild(preset)

    assert workspace.owner.is_system
    assert workspace.builds.get().job.status == "succeeded"
    assert workspace.agents.get().lifecycle_state == "ready"


def test_it_gives_boolean_parameters_as_lowercase_text():
    template = TemplateFactory(
        with_version__parameters=[{"name": "gpu", "default": False}, {"name": "n", "default": 2}]
    )
    preset = PresetFactory(template_version=template.active_version, parameters={"gpu": True})

    workspace = workspace_create(owner=UserFactory(), template=template, name="dev", preset=preset)

    assert workspace.builds.get().parameters == {"gpu": "true", "n": "2"}
