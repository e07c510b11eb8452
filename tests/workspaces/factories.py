"""Factories for workspaces. ``prebuild(...)`` builds a prebuilt workspace in any state."""

from __future__ import annotations

import secrets

import factory
from django.utils import timezone

from accounts import tokens
from accounts.models import SYSTEM_USER_ID, User
from accounts.services import organization_default
from tests.accounts.factories import UserFactory
from workspaces.models import (
    AgentLifecycle,
    JobStatus,
    ProvisionerJob,
    Template,
    TemplateVersion,
    TemplateVersionPreset,
    Transition,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
)
from workspaces.services import AGENT_TOKEN_PREFIX


class TemplateFactory(factory.django.DjangoModelFactory):
    """A template whose active version is created with it (``active_version`` set)."""

    class Meta:
        model = Template
        skip_postgeneration_save = True

    organization = factory.LazyFunction(organization_default)
    name = factory.Sequence(lambda n: f"template-{n}")
    display_name = factory.LazyAttribute(lambda t: t.name.title())

    @factory.post_generation
    def with_version(obj, create, extracted, **kwargs):
        if not create or extracted is False:
            return
        version = TemplateVersionFactory(template=obj, **kwargs)
        obj.active_version = version
        obj.save(update_fields=["active_version"])


class TemplateVersionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = TemplateVersion

    template = factory.SubFactory(TemplateFactory, with_version=False)
    number = factory.Sequence(lambda n: n + 1)
    name = factory.LazyAttribute(lambda v: f"v{v.number}")
    provisioner = "local"
    parameters = factory.LazyFunction(lambda: [{"name": "repo", "default": "https://x.invalid"}])
    agents = factory.LazyFunction(lambda: [{"name": "main", "startup_script": "echo hi"}])


class PresetFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = TemplateVersionPreset

    template_version = factory.LazyFunction(lambda: TemplateFactory().active_version)
    name = factory.Sequence(lambda n: f"preset-{n}")
    parameters = factory.LazyFunction(dict)
    desired_instances = 1


class JobFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ProvisionerJob

    organization = factory.LazyFunction(organization_default)
    status = JobStatus.PENDING

    @factory.lazy_attribute
    def started_at(self):
        return timezone.now() if self.status != JobStatus.PENDING else None

    @factory.lazy_attribute
    def completed_at(self):
        final = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
        return timezone.now() if self.status in final else None


class WorkspaceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Workspace

    template = factory.SubFactory(TemplateFactory)
    organization = factory.LazyAttribute(lambda w: w.template.organization)
    owner = factory.SubFactory(UserFactory)
    name = factory.Sequence(lambda n: f"ws-{n}")


class BuildFactory(factory.django.DjangoModelFactory):
    """A build with its job; pass ``job__status`` to choose the job's state."""

    class Meta:
        model = WorkspaceBuild

    workspace = factory.SubFactory(WorkspaceFactory)
    build_number = factory.LazyAttribute(
        lambda b: (
            (
                b.workspace.builds.order_by("-build_number")
                .values_list("build_number", flat=True)
                .first()
                or 0
            )
            + 1
        )
    )
    transition = Transition.START
    template_version = factory.LazyAttribute(lambda b: b.workspace.template.active_version)
    preset = None
    initiator = factory.LazyAttribute(lambda b: b.workspace.owner)
    job = factory.SubFactory(JobFactory, status=JobStatus.SUCCEEDED)


class AgentFactory(factory.django.DjangoModelFactory):
    """An agent; its plain token is on ``agent.plain_token`` (only hashed in the database)."""

    class Meta:
        model = WorkspaceAgent

    build = factory.SubFactory(BuildFactory)
    workspace = factory.LazyAttribute(lambda a: a.build.workspace)
    name = "main"
    startup_script = "echo hi"
    lifecycle_state = AgentLifecycle.READY
    # A live agent: heard from just now (connected, workspaces.liveness).
    last_seen_at = factory.LazyFunction(timezone.now)

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        new = tokens.generate(AGENT_TOKEN_PREFIX)
        kwargs.update(token_key_id=new.key_id, token_secret_hash=new.secret_hash)
        agent = super()._create(model_class, *args, **kwargs)
        agent.plain_token = new.token
        return agent


def system_user() -> User:
    return User.objects.get(id=SYSTEM_USER_ID, include_system=True)


def prebuild(
    preset: TemplateVersionPreset,
    *,
    status: str = JobStatus.SUCCEEDED,
    transition: str = Transition.START,
    ready: bool = True,
    created_at=None,
    agents: int = 1,
) -> Workspace:
    """A workspace owned by the system user whose latest build of ``preset`` is in ``status``.

    With a succeeded start and ``ready`` it is an eligible prebuild; ``agents`` agents are
    created (ready or starting), kept on ``workspace.created_agents`` with their plain tokens.
    """
    created_at = created_at or timezone.now()
    version = preset.template_version
    workspace = WorkspaceFactory(
        template=version.template,
        owner=system_user(),
        name=f"prebuild-{secrets.token_hex(5)}",
        created_at=created_at,
    )
    build = BuildFactory(
        workspace=workspace,
        transition=transition,
        template_version=version,
        preset=preset,
        initiator=system_user(),
        reason="prebuild",
        job__status=status,
        created_at=created_at,
    )
    state = AgentLifecycle.READY if ready else AgentLifecycle.STARTING
    # Kept on the instance so tests can use the agents' plain tokens.
    workspace.created_agents = [
        AgentFactory(build=build, name=f"agent{index}", lifecycle_state=state)
        for index in range(agents)
    ]
    return workspace
