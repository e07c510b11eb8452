"""Operator pages for the prebuild pools (staff only).

Pages: the overview (every pool, live), a preset's detail, every workspace, the build queue.
Each page serves its own fragments to HTMX (`template#partial`, django-template-partials).

Controls are POST-only, CSRF-protected (the token travels in `hx-headers` on `<body>`), call
one service from `prebuilds.services`, record an `AuditEntry` in the same transaction, and
answer HTMX with the updated fragment of the page they sit on, anyone else with a redirect and
a flash message. Destructive controls confirm with `hx-confirm`; without JavaScript their form
is a GET to a confirmation page whose own form posts to the control.

Access: anonymous → login redirect; signed in but not staff → 403.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST, require_safe

from accounts.services import system_user
from prebuilds import dashboard
from prebuilds.audit import audit_record
from prebuilds.backtest import BacktestError, backtest_prepare
from prebuilds.forms import DesiredInstancesForm, PauseForm, WorkspaceFilterForm
from prebuilds.models import AuditAction
from prebuilds.push_plan import pool_line, preset_invalidate_plan
from prebuilds.reconciler import prebuild_delete
from prebuilds.services import (
    PrebuildsError,
    preset_cancel_pending,
    preset_invalidate,
    preset_reset,
    preset_set_desired_instances,
    reconciliation_pause,
    reconciliation_run_now,
)
from workspaces.models import TemplateVersionPreset, Workspace
from workspaces.selectors import latest_build

WORKSPACES_PAGE_SIZE = 50
JOBS_PAGE_SIZE = 100


def staff_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Anonymous: redirect to the login page. Signed in without staff status: 403."""

    @wraps(view)
    @login_required
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_staff:
            raise PermissionDenied("Operator pages are for staff.")
        return view(request, *args, **kwargs)

    return wrapper


def _preset_or_404(preset_id: UUID) -> TemplateVersionPreset:
    preset = dashboard.preset_get(preset_id)
    if preset is None:
        raise Http404("No such preset.")
    return preset


def _no_content() -> HttpResponse:
    return HttpResponse(status=204)


# ---------------------------------------------------------------------------------------------
# The overview


def _overview_context(notice: tuple[str, str] | None = None, *, fresh: bool = False) -> dict:
    """The overview shared by this process's viewers, or (`fresh`: a control's answer) one
    computed after the control and shared from then on, so the operator sees their action."""
    board = dashboard.overview_fresh() if fresh else dashboard.overview_shared()
    return {"board": board, "notice": notice}


@staff_required
@require_safe
def overview(request: HttpRequest) -> HttpResponse:
    """Every pool, grouped by organization and template, with the global controls.

    To HTMX: with `layout`/`known` (the page's poll, every 3 s while the tab is visible) only
    the pieces that changed, as out-of-band swaps, or 204 when nothing did (see
    `prebuilds.dashboard`); otherwise the `overview-live` fragment. All from the overview
    shared by this process's viewers (about a second old at most): a page costs its rendering.
    """
    context = _overview_context()
    template_name = "prebuilds/overview.html"
    if request.htmx and "known" in request.GET:
        changes = dashboard.overview_changes(
            context["board"],
            layout=request.GET.get("layout", ""),
            known=request.GET.get("known", ""),
        )
        if changes.empty:
            return _no_content()
        context["changes"] = changes
        return render(request, template_name + "#changes", context)
    if request.htmx:
        template_name += "#overview-live"
    return render(request, template_name, context)


def _overview_answer(request: HttpRequest, level: str, text: str) -> HttpResponse:
    """After a global control: the live fragment to HTMX, a redirect with a message otherwise."""
    if request.htmx:
        context = _overview_context((level, text), fresh=True)
        return render(request, "prebuilds/overview.html#overview-live", context)
    dashboard.overview_fresh()  # shared: the page the redirect lands on shows the action
    messages.add_message(request, messages.ERROR if level == "error" else messages.SUCCESS, text)
    return redirect("prebuilds:overview")


@staff_required
@require_POST
def pause(request: HttpRequest) -> HttpResponse:
    """Pause (`paused=true`) or resume (`paused=false`) the reconciler."""
    form = PauseForm(request.POST)
    if not form.is_valid():
        return _overview_answer(request, "error", form.errors["paused"][0])
    paused = form.cleaned_data["paused"]
    reconciliation_pause(paused=paused, actor=request.user)
    text = "Reconciliation paused." if paused else "Reconciliation resumed."
    return _overview_answer(request, "success", text)


@staff_required
@require_POST
def reconcile_now(request: HttpRequest) -> HttpResponse:
    """Run one reconciliation pass now (the same pass Celery beat runs)."""
    # Not in one transaction with the audit entry: the pass gives each preset its own
    # transaction on purpose (services.reconciliation_run_now). The entry follows the pass.
    result = reconciliation_run_now()
    if not result.lock_acquired:
        detail = "skipped: another pass holds the lock"
        text = "Another reconciliation pass is running; try again in a moment."
        level = "error"
    else:
        detail = (
            f"{result.presets_seen} presets, {result.actions_taken} actions, "
            f"{result.errors} errors" + (" (paused: nothing executed)" if result.paused else "")
        )
        text = f"Reconciliation pass done: {detail}."
        level = "error" if result.errors else "success"
    audit_record(user=request.user, action=AuditAction.RECONCILE, detail=detail)
    return _overview_answer(request, level, text)


# ---------------------------------------------------------------------------------------------
# A preset


def _preset_context(
    preset: TemplateVersionPreset,
    *,
    form: DesiredInstancesForm | None = None,
    notice: tuple[str, str] | None = None,
    full: bool = True,
) -> dict:
    pool = dashboard.preset_pool(preset.id)
    row = pool.row
    prebuilds = dashboard.preset_prebuilds(preset, now=pool.computed_at)
    context = {
        "preset": preset,
        "version": preset.template_version,
        "template": preset.template_version.template,
        "row": row,
        "paused": pool.paused,
        "prebuilds": prebuilds,
        "state_version": dashboard.version_of(
            row.version if row else None,
            preset.desired_instances,
            preset.prebuild_status,
            [
                (
                    line.workspace.id,
                    line.build.id if line.build else None,
                    line.build.job.status if line.build else None,
                    line.agents,
                    line.ready,
                    line.expired,
                )
                for line in prebuilds
            ],
        ),
        "form": form or DesiredInstancesForm(initial={"instances": preset.desired_instances}),
        "notice": notice,
    }
    if full:
        hits, miss_reasons = dashboard.preset_miss_reasons(preset, now=pool.computed_at)
        context.update(
            recent_hits=hits,
            miss_reasons=miss_reasons,
            chart=dashboard.preset_chart(preset.id, now=pool.computed_at),
            claims=dashboard.preset_claims(preset),
            miss_window_hours=int(dashboard.MISS_REASONS_WINDOW.total_seconds() // 3600),
            failures=dashboard.preset_failures(preset),
        )
    return context


@staff_required
@require_safe
def preset_detail(request: HttpRequest, preset_id: UUID) -> HttpResponse:
    """One pool: state and pending actions, prebuilds, controls, chart, claims, failures.

    To HTMX polling `#preset-state` (every 5 s while visible) it answers that fragment, or
    204 when its version (`v`, the one the page holds) is unchanged.
    """
    preset = _preset_or_404(preset_id)
    template_name = "prebuilds/preset.html"
    if request.htmx and request.htmx.target == "preset-state":
        context = _preset_context(preset, full=False)
        if request.GET.get("v") == context["state_version"]:
            return _no_content()
        return render(request, template_name + "#preset-state", context)
    if request.htmx:
        return render(request, template_name + "#preset-live", _preset_context(preset, full=False))
    return render(request, template_name, _preset_context(preset))


def _preset_answer(
    request: HttpRequest, preset: TemplateVersionPreset, level: str, text: str
) -> HttpResponse:
    """After a preset control: the live fragment to HTMX, a redirect with a message otherwise."""
    if request.htmx:
        preset = _preset_or_404(preset.id)  # re-read: the service changed it
        context = _preset_context(preset, notice=(level, text), full=False)
        return render(request, "prebuilds/preset.html#preset-live", context)
    messages.add_message(request, messages.ERROR if level == "error" else messages.SUCCESS, text)
    return redirect("prebuilds:preset", preset_id=preset.id)


@staff_required
@require_POST
def preset_desired_instances(request: HttpRequest, preset_id: UUID) -> HttpResponse:
    """Set the pool size. Bad input: the form again with the error, nothing changed (400
    without HTMX; 200 to HTMX, which does not swap error statuses by default)."""
    preset = _preset_or_404(preset_id)
    form = DesiredInstancesForm(request.POST)
    if form.is_valid():
        instances = form.cleaned_data["instances"]
        try:
            preset_set_desired_instances(preset=preset, instances=instances, actor=request.user)
        except PrebuildsError as exc:
            form.add_error("instances", f"Desired instances: {exc.detail}")
        else:
            text = f"Desired instances of {preset.name} set to {_instances(instances)}."
            return _preset_answer(request, preset, "success", text)
    notice = ("error", form.errors["instances"][0])
    if request.htmx:
        context = _preset_context(preset, form=form, notice=notice, full=False)
        return render(request, "prebuilds/preset.html#preset-live", context)
    context = _preset_context(preset, form=form, notice=notice)
    return render(request, "prebuilds/preset.html", context, status=400)


def _instances(value: int | None) -> str:
    return "none" if value is None else str(value)


@staff_required
@require_POST
def preset_invalidate_view(request: HttpRequest, preset_id: UUID) -> HttpResponse:
    """Expire every current prebuild of the preset; the next pass replaces them."""
    preset = _preset_or_404(preset_id)
    with transaction.atomic():
        preset_invalidate(preset=preset)
        audit_record(user=request.user, action=AuditAction.INVALIDATE, preset=preset)
    text = f"Prebuilds of {preset.name} invalidated: the next pass replaces them."
    return _preset_answer(request, preset, "success", text)


@staff_required
@require_POST
def preset_reset_view(request: HttpRequest, preset_id: UUID) -> HttpResponse:
    """Clear a hard limit or validation failure so the reconciler tries the preset again."""
    preset = _preset_or_404(preset_id)
    before = preset.get_prebuild_status_display()
    with transaction.atomic():
        changed = preset_reset(preset=preset)
        if changed:
            audit_record(
                user=request.user, action=AuditAction.RESET, preset=preset, detail=f"was {before}"
            )
    if not changed:
        return _preset_answer(request, preset, "error", f"{preset.name} is already healthy.")
    return _preset_answer(request, preset, "success", f"{preset.name} reset to healthy.")


@staff_required
@require_POST
def preset_cancel_pending_view(request: HttpRequest, preset_id: UUID) -> HttpResponse:
    """Cancel the preset's prebuild builds that no worker has picked up."""
    preset = _preset_or_404(preset_id)
    with transaction.atomic():
        count = preset_cancel_pending(preset=preset)
        audit_record(
            user=request.user,
            action=AuditAction.CANCEL_PENDING,
            preset=preset,
            detail=f"{count} canceled",
        )
    return _preset_answer(request, preset, "success", f"{count} pending prebuild builds canceled.")


@staff_required
@require_POST
def prebuild_delete_view(request: HttpRequest, workspace_id: UUID) -> HttpResponse:
    """Queue a delete build for one prebuild, if it is still one (never a claimed workspace)."""
    workspace = Workspace.objects.filter(id=workspace_id).first()
    if workspace is None:
        raise Http404("No such workspace.")
    build = workspace.builds.select_related("preset").order_by("-build_number").first()
    preset = build.preset if build else None
    with transaction.atomic():
        deleted = prebuild_delete(workspace_id=workspace.id, owner=system_user())
        if deleted:
            audit_record(
                user=request.user,
                action=AuditAction.DELETE_PREBUILD,
                workspace=workspace,
                preset=preset,
                target=workspace.name,
            )
    if deleted:
        level, text = "success", f"Prebuild {workspace.name} is being deleted."
    else:
        level = "error"
        text = (
            f"{workspace.name} was not deleted: it is no longer a prebuild "
            "or a build is in progress."
        )
    if preset is None:
        return _overview_answer(request, level, text)
    return _preset_answer(request, preset, level, text)


# Confirmation pages for browsers without JavaScript (HTMX asks with hx-confirm instead).
CONFIRMATIONS = {
    "invalidate": (
        "prebuilds:preset-invalidate",
        "Invalidate every prebuild of {name}?",
        "Current prebuilds count as expired and are replaced by the next passes.",
        "Invalidate",
    ),
    "cancel-pending": (
        "prebuilds:preset-cancel-pending",
        "Cancel the pending prebuild builds of {name}?",
        "Builds no worker has picked up yet are canceled; running ones are not touched.",
        "Cancel pending builds",
    ),
}


BACKTEST_DAYS = (1, 7, 14, 28)


@staff_required
@require_safe
def preset_backtest(request: HttpRequest, preset_id: UUID) -> HttpResponse:
    """The `simulate_prebuilds` comparison for this preset's recorded demand (its own policies:
    `fixed:<instances>`, its schedule, `target:<its rate or 0.95>`), seed 0. Writes nothing."""
    preset = _preset_or_404(preset_id)
    raw_days = request.GET.get("days", "7")
    context: dict = {"preset": preset, "days_choices": BACKTEST_DAYS, "days": raw_days}
    status = 200
    if not raw_days.isdigit() or int(raw_days) not in BACKTEST_DAYS:
        context["error"] = f"days: must be one of {', '.join(map(str, BACKTEST_DAYS))}"
        status = 400
    else:
        try:
            backtest = backtest_prepare(
                preset_id=str(preset.id),
                days=int(raw_days),
                demand_path=None,
                build_seconds_path=None,
                policies=(),
            )
        except BacktestError as exc:
            context["error"] = str(exc).replace("--build-seconds-file: ", "")
        else:
            context.update(backtest=backtest, reports=backtest.run(0))
    return render(request, "prebuilds/backtest.html", context, status=status)


@staff_required
@require_safe
def preset_confirm(request: HttpRequest, preset_id: UUID, action: str) -> HttpResponse:
    preset = _preset_or_404(preset_id)
    if action not in CONFIRMATIONS:
        raise Http404("No such control.")
    url_name, question, explanation, button = CONFIRMATIONS[action]
    context = {
        "question": question.format(name=preset.name),
        "explanation": explanation,
        "button": button,
        "action_url": reverse(url_name, kwargs={"preset_id": preset.id}),
        "back_url": reverse("prebuilds:preset", kwargs={"preset_id": preset.id}),
    }
    if action == "invalidate":
        # What the next pass would do, computed in a rolled-back invalidation (writes nothing).
        pool, _ = preset_invalidate_plan(preset=preset)
        context["preview"] = (
            f"Then: {pool_line(pool)}." if pool else "Then: no prebuilds to replace."
        )
    return render(request, "prebuilds/confirm.html", context)


@staff_required
@require_safe
def prebuild_delete_confirm(request: HttpRequest, workspace_id: UUID) -> HttpResponse:
    workspace = Workspace.objects.filter(id=workspace_id).first()
    if workspace is None:
        raise Http404("No such workspace.")
    build = workspace.builds.order_by("-build_number").first()
    back = (
        reverse("prebuilds:preset", kwargs={"preset_id": build.preset_id})
        if build and build.preset_id
        else reverse("workspaces:detail", kwargs={"workspace_id": workspace.id})
    )
    context = {
        "question": f"Delete prebuild {workspace.name}?",
        "explanation": "A delete build is queued; the next pass creates a replacement.",
        "button": "Delete prebuild",
        "action_url": reverse("prebuilds:prebuild-delete", kwargs={"workspace_id": workspace.id}),
        "back_url": back,
    }
    return render(request, "prebuilds/confirm.html", context)


# ---------------------------------------------------------------------------------------------
# Staff pages: every workspace, the build queue


@staff_required
@require_safe
def workspaces(request: HttpRequest) -> HttpResponse:
    """Every live workspace (prebuilds included), filtered by owner, template, prebuilds only
    and status of the latest build; 50 a page, a fixed number of queries."""
    form = WorkspaceFilterForm(request.GET or None, templates=dashboard.template_choices())
    filters = form.cleaned_data if form.is_valid() else {}
    queryset = dashboard.staff_workspaces(
        owner=(filters.get("owner") or "").strip(),
        template=filters.get("template"),
        prebuilds_only=bool(filters.get("prebuilds")),
        status=filters.get("status") or "",
    )
    page = Paginator(queryset, WORKSPACES_PAGE_SIZE).get_page(request.GET.get("page"))
    context = {
        "form": form,
        "page": page,
        "rows": [(workspace, latest_build(workspace)) for workspace in page.object_list],
        "filtered": any(filters.values()) if filters else False,
    }
    return render(request, "prebuilds/workspaces.html", context)


@staff_required
@require_safe
def jobs(request: HttpRequest) -> HttpResponse:
    """The build queue: pending, running and canceling jobs, oldest first; to HTMX (the page
    polls every 5 s while visible) only the `queue` fragment."""
    page = Paginator(dashboard.build_queue(), JOBS_PAGE_SIZE).get_page(request.GET.get("page"))
    template_name = "prebuilds/jobs.html"
    if request.htmx:
        template_name += "#queue"
    return render(request, template_name, {"page": page})
