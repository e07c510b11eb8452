"""Admin for templates, presets, workspaces, builds, provisioner jobs and agents.

Read-mostly by design. Versions are immutable (a database trigger says so); workspaces, builds,
jobs and agents change only through services, which keep the invariants the database alone
cannot (one build in progress per workspace, jobs enqueued after commit, the job state
machine). So the admin edits only operational settings — a template's active version and
flags, a preset's pool settings and schedules — and every other change is an *action* that
calls the same service the API and the pages call.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from workspaces import jobs
from workspaces.admin_forms import (
    PresetAdminForm,
    ScheduleAdminForm,
    ScheduleForm,
    ScheduleFormSet,
    TemplateAdminForm,
)
from workspaces.models import (
    PresetSchedule,
    ProvisionerJob,
    Template,
    TemplateVersion,
    TemplateVersionPreset,
    Transition,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
)
from workspaces.services import WorkspaceError, build_create, workspaces_forget_host


class ReadOnlyAdmin(admin.ModelAdmin):
    """View-only: rows are created and changed by services, never by hand."""

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class PrebuildFilter(admin.SimpleListFilter):
    """Prebuilds are owned by the system user, which the user filters hide on purpose."""

    title = "prebuild"
    parameter_name = "prebuild"

    def lookups(self, request, model_admin):
        return [("yes", "Prebuilds (system owner)"), ("no", "User workspaces")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(owner__is_system=True)
        if self.value() == "no":
            return queryset.filter(owner__is_system=False)
        return queryset


def _cancel_jobs(modeladmin: admin.ModelAdmin, request: HttpRequest, job_ids: list) -> None:
    outcomes = [jobs.job_cancel(job_id) for job_id in job_ids]
    done = sum(1 for outcome in outcomes if outcome is not None)
    skipped = len(outcomes) - done
    modeladmin.message_user(request, f"Cancel requested for {done} job(s).", messages.SUCCESS)
    if skipped:
        modeladmin.message_user(
            request, f"{skipped} job(s) had already finished.", messages.WARNING
        )


# -- templates --------------------------------------------------------------------------------


class VersionInline(ReadOnlyInline):
    model = TemplateVersion
    fields = ("number", "name", "provisioner", "created_by", "created_at")
    readonly_fields = fields
    ordering = ("-number",)


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    """Templates come from ``push_template``; here an operator switches the active version,
    deprecates or (soft-)deletes a template. A switch that would raise the organization's
    prebuilt instances above their maximum is refused (``admin_forms.TemplateAdminForm``)."""

    form = TemplateAdminForm
    list_display = (
        "name",
        "display_name",
        "organization",
        "active_version",
        "deprecated",
        "deleted",
        "created_at",
    )
    list_filter = ("organization", "deprecated", "deleted")
    list_select_related = ("organization", "active_version", "active_version__template")
    search_fields = ("name", "display_name", "id")
    readonly_fields = ("id", "organization", "name", "created_at", "updated_at")
    fields = (*readonly_fields[:3], "display_name", "active_version", "deprecated", "deleted")
    inlines = [VersionInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # python manage.py push_template PATH

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # workspaces keep their template: set "deleted" instead

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "active_version":
            # Only versions of this template may become its active version.
            object_id = request.resolver_match.kwargs.get("object_id")
            kwargs["queryset"] = TemplateVersion.objects.filter(template_id=object_id)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)


class PresetInline(ReadOnlyInline):
    model = TemplateVersionPreset
    fields = ("name", "desired_instances", "prebuild_status")
    readonly_fields = fields


@admin.register(TemplateVersion)
class TemplateVersionAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "template", "number", "provisioner", "created_by", "created_at")
    list_filter = ("provisioner", "template__organization")
    list_select_related = ("template", "created_by")
    search_fields = ("name", "template__name", "id")
    inlines = [PresetInline]


class ScheduleInline(admin.TabularInline):
    model = PresetSchedule
    form = ScheduleForm
    formset = ScheduleFormSet
    extra = 0


@admin.register(TemplateVersionPreset)
class PresetAdmin(admin.ModelAdmin):
    """The parameters belong to the immutable version; the pool settings are operational (an
    operator lifts a hard limit by setting the prebuild status back to healthy). Time zones,
    crons and instance counts are checked as strictly as in a template file (``admin_forms``)."""

    form = PresetAdminForm
    list_display = (
        "name",
        "template_version",
        "desired_instances",
        "invalidate_after",
        "prebuild_status",
    )
    list_filter = ("prebuild_status", "template_version__template__organization")
    list_select_related = ("template_version", "template_version__template")
    search_fields = ("name", "template_version__template__name", "id")
    # The sizing goal comes from the template file (checked there, with the pool limits); shown
    # here, not edited, so the admin needs no second set of those checks.
    readonly_fields = (
        "id",
        "template_version",
        "name",
        "parameters",
        "target_hit_rate",
        "min_instances",
        "max_instances",
        "cost_per_hour",
    )
    fields = (
        *readonly_fields,
        "desired_instances",
        "invalidate_after",
        "scheduling_timezone",
        "last_invalidated_at",
        "prebuild_status",
        "prebuild_status_reason",
    )
    inlines = [ScheduleInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # presets come with their version from the template file

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(PresetSchedule)
class PresetScheduleAdmin(admin.ModelAdmin):
    form = ScheduleAdminForm
    list_display = ("preset", "position", "cron", "instances")
    list_select_related = ("preset", "preset__template_version__template")
    search_fields = ("preset__name", "cron")


# -- workspaces -------------------------------------------------------------------------------


class BuildInline(ReadOnlyInline):
    model = WorkspaceBuild
    fields = ("build_number", "transition", "job_status", "initiator", "is_claim", "created_at")
    readonly_fields = fields
    ordering = ("-build_number",)

    @admin.display(description="status")
    def job_status(self, build: WorkspaceBuild) -> str:
        return build.job.status

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).select_related("job", "initiator")


class AgentInline(ReadOnlyInline):
    model = WorkspaceAgent
    fields = ("name", "lifecycle_state", "initialized_owner", "last_seen_at", "retired_at")
    readonly_fields = fields


@admin.register(Workspace)
class WorkspaceAdmin(admin.ModelAdmin):
    """Workspaces are created by users and the reconciler; the owner changes only by a claim."""

    list_display = ("name", "owner", "template", "organization", "deleted", "claimed_at")
    list_filter = (PrebuildFilter, "deleted", "organization", "template")
    list_select_related = ("owner", "template", "organization")
    search_fields = ("name", "owner__username", "id")
    date_hierarchy = "created_at"
    readonly_fields = (
        "id",
        "name",
        "owner",
        "organization",
        "template",
        "deleted",
        "claimed_at",
        "host_queue",
        "created_at",
        "updated_at",
    )
    inlines = [BuildInline, AgentInline]
    actions = ["queue_stop_build", "queue_delete_build", "forget_host"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # a delete build removes a workspace

    def has_queue_build_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("workspaces.add_workspacebuild")

    def _queue(self, request: HttpRequest, queryset: QuerySet, transition: str) -> None:
        queued, refused = 0, []
        for workspace in queryset:
            try:
                build_create(workspace=workspace, transition=transition, initiator=request.user)
            except WorkspaceError as exc:
                refused.append(f"{workspace.name}: {exc.detail}")
            else:
                queued += 1
        self.message_user(request, f"Queued {queued} {transition} build(s).", messages.SUCCESS)
        for line in refused:
            self.message_user(request, line, messages.WARNING)

    @admin.action(description="Queue stop build", permissions=["queue_build"])
    def queue_stop_build(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._queue(request, queryset, Transition.STOP)

    @admin.action(description="Queue delete build", permissions=["queue_build"])
    def queue_delete_build(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._queue(request, queryset, Transition.DELETE)

    def has_forget_host_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("workspaces.change_workspace")

    @admin.action(
        description="Forget worker host (next builds run on any worker)",
        permissions=["forget_host"],
    )
    def forget_host(self, request: HttpRequest, queryset: QuerySet) -> None:
        changed = workspaces_forget_host(workspace_ids=queryset.values_list("id", flat=True))
        self.message_user(
            request,
            f"{changed} workspace(s) no longer tied to a worker host; queue a build to go on.",
            messages.SUCCESS,
        )


@admin.register(WorkspaceBuild)
class WorkspaceBuildAdmin(ReadOnlyAdmin):
    list_display = (
        "__str__",
        "transition",
        "job_status",
        "initiator",
        "reason",
        "is_claim",
        "created_at",
    )
    list_filter = ("transition", "job__status", "reason", "is_claim")
    list_select_related = ("workspace", "job", "initiator")
    search_fields = ("workspace__name", "workspace__id", "id")
    date_hierarchy = "created_at"
    actions = ["cancel_job"]

    @admin.display(description="status", ordering="job__status")
    def job_status(self, build: WorkspaceBuild) -> str:
        return build.job.status

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("workspaces.change_provisionerjob")

    @admin.action(description="Cancel job", permissions=["cancel"])
    def cancel_job(self, request: HttpRequest, queryset: QuerySet) -> None:
        _cancel_jobs(self, request, list(queryset.values_list("job_id", flat=True)))


@admin.register(ProvisionerJob)
class ProvisionerJobAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "status",
        "failure_kind",
        "queue",
        "worker",
        "created_at",
        "started_at",
        "completed_at",
    )
    list_filter = ("status", "failure_kind", "queue", "organization")
    search_fields = ("id", "worker", "build__workspace__name")
    date_hierarchy = "created_at"
    actions = ["cancel_job"]

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("workspaces.change_provisionerjob")

    @admin.action(description="Cancel job", permissions=["cancel"])
    def cancel_job(self, request: HttpRequest, queryset: QuerySet) -> None:
        _cancel_jobs(self, request, list(queryset.values_list("id", flat=True)))


@admin.register(WorkspaceAgent)
class WorkspaceAgentAdmin(ReadOnlyAdmin):
    list_display = (
        "__str__",
        "lifecycle_state",
        "initialized_owner",
        "ready_at",
        "last_seen_at",
        "retired_at",
    )
    list_filter = ("lifecycle_state", ("retired_at", admin.EmptyFieldListFilter))
    list_select_related = ("workspace", "initialized_owner")
    search_fields = ("name", "workspace__name", "workspace__id", "id")
    # The token hash is a credential: never shown.
    exclude = ("token_secret_hash",)
