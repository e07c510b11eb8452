"""Templates, versions, presets, workspaces, builds, provisioner jobs and agents.

Vocabulary (DESIGN.md §1): a *template* has one active *version*; a version is immutable and
carries the provisioner, agents and parameters; a *preset* is a named set of parameter values on
a version and may declare prebuilds. A *workspace* changes through *builds* (start, stop,
delete), each executed as one *provisioner job*. *Agents* run inside a workspace.

Invariants that matter under concurrency are enforced by the database, not only by Python:
unique live workspace names per owner, unique build numbers per workspace, one build per job,
valid states, and the immutability of template versions (a trigger, migration 0002).
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID, Organization


def _choices_check(field: str, choices: type[models.TextChoices], name: str):
    return models.CheckConstraint(condition=Q(**{f"{field}__in": choices.values}), name=name)


class Provisioner(models.TextChoices):
    LOCAL = "local", "Local processes"
    COMMAND = "command", "External command"


class Template(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="templates"
    )
    name = models.SlugField(max_length=64)
    display_name = models.CharField(max_length=200, blank=True)
    active_version = models.ForeignKey(
        "TemplateVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    deleted = models.BooleanField(default=False)
    deprecated = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["organization__name", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "name"],
                condition=Q(deleted=False),
                name="template_name_unique_live",
            )
        ]

    def __str__(self) -> str:
        return self.display_name or self.name


class TemplateVersion(models.Model):
    """An immutable revision of a template (the trigger refuses changes to its definition)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    template = models.ForeignKey(Template, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    name = models.CharField(max_length=64)
    provisioner = models.CharField(max_length=16, choices=Provisioner.choices)
    # {"command": ["path", "arg", ...]} for the command provisioner; {} for local.
    provisioner_config = models.JSONField(default=dict, blank=True)
    # [{"name": ..., "default": ..., "description": ...}]
    parameters = models.JSONField(default=list, blank=True)
    # [{"name": ..., "startup_script": ...}]
    agents = models.JSONField(default=list, blank=True)
    source = models.TextField(blank=True, help_text="The template file this version came from.")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["template", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["template", "number"], name="version_number_unique"),
            _choices_check("provisioner", Provisioner, "version_provisioner_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.template.name} {self.name}"


class PrebuildStatus(models.TextChoices):
    HEALTHY = "healthy", "Healthy"
    HARD_LIMITED = "hard_limited", "Hard limited"
    VALIDATION_FAILED = "validation_failed", "Validation failed"


class TemplateVersionPreset(models.Model):
    """A named set of parameter values on a version; may declare a prebuild pool.

    The parameters belong to the immutable version; the pool settings (``desired_instances``,
    TTL, schedules, status) are operational and may change.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    template_version = models.ForeignKey(
        TemplateVersion, on_delete=models.CASCADE, related_name="presets"
    )
    name = models.CharField(max_length=64)
    parameters = models.JSONField(default=dict, blank=True)
    desired_instances = models.PositiveIntegerField(
        null=True, blank=True, help_text="Prebuilds to keep ready; empty: no prebuilds."
    )
    invalidate_after = models.DurationField(
        null=True, blank=True, help_text="Time-to-live of a prebuild; empty or 0 disables."
    )
    scheduling_timezone = models.CharField(max_length=64, blank=True)
    last_invalidated_at = models.DateTimeField(null=True, blank=True)
    prebuild_status = models.CharField(
        max_length=20, choices=PrebuildStatus.choices, default=PrebuildStatus.HEALTHY
    )
    prebuild_status_reason = models.TextField(blank=True)
    prebuild_status_changed_at = models.DateTimeField(null=True, blank=True)
    # Sizing by a goal (prebuilds.sizing): with a target, the reconciler derives the pool size
    # from recorded demand within [min_instances, max_instances]; desired_instances and the
    # schedules are the fallback while the history is too short.
    target_hit_rate = models.FloatField(
        null=True, blank=True, help_text="Share of claim requests to serve warm (0-1, exclusive)."
    )
    min_instances = models.PositiveIntegerField(default=0)
    max_instances = models.PositiveIntegerField(null=True, blank=True)
    cost_per_hour = models.FloatField(
        null=True, blank=True, help_text="Cost of one prebuild for an hour (economics only)."
    )

    class Meta:
        ordering = ["template_version", "name"]
        constraints = [
            models.UniqueConstraint(fields=["template_version", "name"], name="preset_name_unique"),
            _choices_check("prebuild_status", PrebuildStatus, "preset_prebuild_status_valid"),
            models.CheckConstraint(
                condition=Q(invalidate_after__isnull=True) | Q(invalidate_after__gte=timedelta(0)),
                name="preset_ttl_not_negative",
            ),
            models.CheckConstraint(
                condition=Q(target_hit_rate__isnull=True)
                | Q(target_hit_rate__gt=0, target_hit_rate__lt=1, max_instances__isnull=False),
                name="preset_target_hit_rate_valid",
            ),
            models.CheckConstraint(
                condition=Q(max_instances__isnull=True) | Q(max_instances__gte=F("min_instances")),
                name="preset_sizing_bounds_ordered",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class PresetSchedule(models.Model):
    """A cron window in which the preset wants ``instances`` prebuilds; first match wins."""

    preset = models.ForeignKey(
        TemplateVersionPreset, on_delete=models.CASCADE, related_name="schedules"
    )
    position = models.PositiveIntegerField(default=0)
    cron = models.CharField(max_length=100)
    instances = models.PositiveIntegerField()

    class Meta:
        ordering = ["preset", "position"]
        constraints = [
            models.UniqueConstraint(fields=["preset", "position"], name="schedule_position_unique")
        ]

    def __str__(self) -> str:
        return f"{self.cron} → {self.instances}"


class Workspace(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="workspaces"
    )
    template = models.ForeignKey(Template, on_delete=models.PROTECT, related_name="workspaces")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="workspaces"
    )
    name = models.CharField(max_length=64)
    deleted = models.BooleanField(default=False)
    # Set when a user claimed this workspace from a prebuild pool.
    claimed_at = models.DateTimeField(null=True, blank=True)
    # For local workspaces: the Celery queue of the worker host that holds the processes.
    host_queue = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "name"],
                condition=Q(deleted=False),
                name="workspace_name_unique_live",
            )
        ]
        indexes = [
            models.Index(fields=["owner", "deleted"], name="workspace_owner_live"),
            # The live prebuilds of each template, oldest first: where a claim looks for one
            # to take (``prebuilds.claims``). A claimed or deleted workspace leaves it.
            models.Index(
                fields=["template", "created_at"],
                condition=Q(owner_id=SYSTEM_USER_ID, deleted=False),
                name="workspace_prebuild",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def claimed_prebuild(self) -> bool:
        return self.claimed_at is not None


class Transition(models.TextChoices):
    START = "start", "Start"
    STOP = "stop", "Stop"
    DELETE = "delete", "Delete"


class BuildReason(models.TextChoices):
    INITIATOR = "initiator", "Requested by the initiator"
    PREBUILD = "prebuild", "Prebuild reconciliation"
    CLAIM = "claim", "Prebuild claimed"


class JobStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELING = "canceling", "Canceling"
    CANCELED = "canceled", "Canceled"


class FailureKind(models.TextChoices):
    """Why a failed job failed: the template's own fault, or the machinery's.

    Only ``template`` failures count towards a preset's back-off and hard limit: a template
    that fails will fail again, while a lost worker or a database outage says nothing about
    the template (README "Reliability"). A failure we cannot place is a ``template`` one, the
    conservative choice: it keeps the back-off that protects against a build loop.
    """

    TEMPLATE = "template", "Template"
    INFRASTRUCTURE = "infrastructure", "Infrastructure"


ACTIVE_JOB_STATUSES = (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.CANCELING)
FINAL_JOB_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class ProvisionerJob(models.Model):
    """The unit of work a worker executes: pending → running → succeeded / failed / canceled."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.PENDING)
    queue = models.CharField(max_length=200, default="default")
    worker = models.CharField(max_length=200, blank=True)
    error = models.TextField(blank=True)
    # Set on failed jobs only ("" otherwise); see ``FailureKind``.
    failure_kind = models.CharField(max_length=16, choices=FailureKind.choices, blank=True)
    logs = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    canceled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            _choices_check("status", JobStatus, "job_status_valid"),
            models.CheckConstraint(
                condition=~Q(status__in=FINAL_JOB_STATUSES) | Q(completed_at__isnull=False),
                name="job_final_has_completed_at",
            ),
            models.CheckConstraint(
                condition=~Q(status=JobStatus.RUNNING) | Q(started_at__isnull=False),
                name="job_running_has_started_at",
            ),
            models.CheckConstraint(
                condition=Q(failure_kind="")
                | Q(status=JobStatus.FAILED, failure_kind__in=FailureKind.values),
                name="job_failure_kind_valid",
            ),
        ]
        indexes = [
            models.Index(
                fields=["status", "heartbeat_at"],
                condition=Q(status__in=("pending", "running", "canceling")),
                name="job_active",
            )
        ]

    def __str__(self) -> str:
        return f"job {self.id} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_JOB_STATUSES


class WorkspaceBuild(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="builds")
    build_number = models.PositiveIntegerField()
    transition = models.CharField(max_length=8, choices=Transition.choices)
    template_version = models.ForeignKey(
        TemplateVersion, on_delete=models.PROTECT, related_name="builds"
    )
    preset = models.ForeignKey(
        TemplateVersionPreset,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="builds",
    )
    # The effective parameter values: version defaults overlaid with the preset's values.
    parameters = models.JSONField(default=dict, blank=True)
    initiator = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    reason = models.CharField(
        max_length=16, choices=BuildReason.choices, default=BuildReason.INITIATOR
    )
    is_claim = models.BooleanField(default=False)
    job = models.OneToOneField(ProvisionerJob, on_delete=models.PROTECT, related_name="build")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["workspace", "-build_number"]
        constraints = [
            models.UniqueConstraint(
                fields=["workspace", "build_number"], name="build_number_unique"
            ),
            _choices_check("transition", Transition, "build_transition_valid"),
            _choices_check("reason", BuildReason, "build_reason_valid"),
            models.CheckConstraint(
                condition=Q(is_claim=False) | Q(transition=Transition.START),
                name="build_claim_is_start",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.workspace} #{self.build_number} {self.transition}"


class AgentLifecycle(models.TextChoices):
    CREATED = "created", "Created"
    STARTING = "starting", "Starting"
    READY = "ready", "Ready"
    START_ERROR = "start_error", "Start error"
    SHUTTING_DOWN = "shutting_down", "Shutting down"
    OFF = "off", "Off"


# States an agent may report through the lifecycle endpoint.
REPORTABLE_LIFECYCLE_STATES = (
    AgentLifecycle.STARTING,
    AgentLifecycle.READY,
    AgentLifecycle.START_ERROR,
    AgentLifecycle.SHUTTING_DOWN,
    AgentLifecycle.OFF,
)


class WorkspaceAgent(models.Model):
    """An agent process inside a workspace. Created by a (non-claim) start build.

    A later start build retires the previous agents (``retired_at``) and creates new ones with
    new tokens; a claim build keeps the running agents, which re-initialise for the new owner.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="agents")
    build = models.ForeignKey(WorkspaceBuild, on_delete=models.CASCADE, related_name="agents")
    name = models.CharField(max_length=64)
    startup_script = models.TextField(blank=True)
    token_key_id = models.CharField(max_length=32, unique=True, editable=False)
    token_secret_hash = models.CharField(max_length=64, editable=False)
    lifecycle_state = models.CharField(
        max_length=16, choices=AgentLifecycle.choices, default=AgentLifecycle.CREATED
    )
    lifecycle_changed_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    # The owner the agent last initialised for (recorded when it fetches its manifest).
    initialized_owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    initialized_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    retired_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["workspace", "name"]
        constraints = [
            _choices_check("lifecycle_state", AgentLifecycle, "agent_lifecycle_valid"),
            models.UniqueConstraint(
                fields=["workspace", "name"],
                condition=Q(retired_at__isnull=True),
                name="agent_name_unique_current",
            ),
        ]
        indexes = [
            models.Index(
                fields=["workspace"], condition=Q(retired_at__isnull=True), name="agent_current"
            ),
            # "Is any current agent not ready?" for the claim's eligibility test, answered
            # without reading the (mostly ready) agents of a pool.
            models.Index(
                fields=["workspace"],
                condition=Q(retired_at__isnull=True) & ~Q(lifecycle_state=AgentLifecycle.READY),
                name="agent_current_not_ready",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.workspace}.{self.name}"
