"""``GET /api/v2/workspaces``: the caller's workspaces, one page at a time (DESIGN.md §7).

Guarantees:

- **Who sees what**: a user lists their own workspaces; staff list everybody's. Prebuilds (owned
  by the system user) are never listed to non-staff and listed to staff only with
  ``owner=prebuilds`` (or the system user's id): a healthy pool can hold far more of them than
  there are user workspaces. ``owner`` (a username, or a user id) narrows the list; for a
  non-staff caller any owner other than themselves gives an empty list, never an error, so
  the answer says nothing about other accounts.
- **Stable order**: oldest first, by ``(created_at, id)``, a total order. The cursor is the
  position of the last row of a page (keyset pagination, not an offset), so rows inserted or
  deleted while a client pages through never make it skip or repeat a row that existed when
  it started; new workspaces turn up on the later pages.
- **Deleted workspaces** are left out, unless ``status=deleted`` asks for them.
- **Cost**: the same number of queries for any page size and any number of workspaces (the
  page, its latest builds, its agents: ``selectors.workspace_queryset``).

Bad parameters raise ``ListingError`` naming the parameter (the view answers 400).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from django.db.models import OuterRef, Q, QuerySet, Subquery

from accounts.models import SYSTEM_USER_ID, SYSTEM_USERNAME, User
from workspaces import selectors
from workspaces.models import JobStatus, Transition, Workspace, WorkspaceBuild

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
PARAMETERS = ("limit", "cursor", "template_id", "status", "owner")

# Coder's workspace statuses, from the latest build's transition and its job's status. A
# client can compute the same from ``latest_build`` in the answer.
_IN_FLIGHT = {
    Transition.START: "starting",
    Transition.STOP: "stopping",
    Transition.DELETE: "deleting",
}
_DONE = {Transition.START: "running", Transition.STOP: "stopped", Transition.DELETE: "deleted"}
STATUSES = (
    "pending",
    "starting",
    "running",
    "stopping",
    "stopped",
    "deleting",
    "deleted",
    "failed",
    "canceling",
    "canceled",
)


class ListingError(Exception):
    """A bad query parameter; ``parameter`` names it."""

    def __init__(self, parameter: str, detail: str) -> None:
        super().__init__(f"{parameter}: {detail}")
        self.parameter = parameter
        self.detail = f"{parameter}: {detail}"


@dataclass(frozen=True)
class Query:
    limit: int = DEFAULT_LIMIT
    after: tuple[dt.datetime, uuid.UUID] | None = None
    template_id: uuid.UUID | None = None
    status: str | None = None
    owner: str | None = None


@dataclass(frozen=True)
class Page:
    workspaces: list[Workspace]
    next_cursor: str | None


def encode_cursor(workspace: Workspace) -> str:
    """The opaque cursor after ``workspace``: its ``(created_at, id)``, base64url-encoded JSON.

    Opaque to clients (the format may change); not a secret: it only names a position.
    """
    raw = json.dumps([workspace.created_at.isoformat(), str(workspace.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, ident = json.loads(raw)
        after = (dt.datetime.fromisoformat(created), uuid.UUID(ident))
    except (binascii.Error, ValueError, TypeError, RecursionError):
        raise ListingError("cursor", "not a cursor this API handed out.") from None
    if after[0].tzinfo is None:
        raise ListingError("cursor", "not a cursor this API handed out.")
    return after


def parse_query(params: Mapping[str, Sequence[str]]) -> Query:
    """The listing's parameters from a query string (``QueryDict.lists()`` shape)."""
    values: dict[str, str] = {}
    for name, given in params.items():
        if name not in PARAMETERS:
            raise ListingError(name, f"unknown parameter. Allowed: {', '.join(PARAMETERS)}.")
        if len(given) != 1:
            raise ListingError(name, "give it at most once.")
        values[name] = given[0]
    limit = DEFAULT_LIMIT
    if "limit" in values:
        text = values["limit"]
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
            raise ListingError("limit", f"a whole number from 1 to {MAX_LIMIT}.")
        limit = int(text)
    # An empty cursor is the first page: a client may start its loop with ``cursor=``.
    after = decode_cursor(values["cursor"]) if values.get("cursor") else None
    template_id = None
    if "template_id" in values:
        template_id = selectors.parse_uuid(values["template_id"])
        if template_id is None:
            raise ListingError("template_id", "not a valid UUID.")
    status = values.get("status")
    if status is not None and status not in STATUSES:
        raise ListingError("status", f"use one of {', '.join(STATUSES)}.")
    owner = values.get("owner")
    if owner is not None and not owner:
        raise ListingError("owner", "a username or a user id, not empty.")
    return Query(limit=limit, after=after, template_id=template_id, status=status, owner=owner)


def _status_filter(status: str) -> Q:
    if status == JobStatus.PENDING:
        return Q(_job_status=JobStatus.PENDING)
    if status in (JobStatus.FAILED, JobStatus.CANCELING, JobStatus.CANCELED):
        return Q(_job_status=status)
    for table, job_status in ((_IN_FLIGHT, JobStatus.RUNNING), (_DONE, JobStatus.SUCCEEDED)):
        for transition, name in table.items():
            if name == status:
                return Q(_transition=transition, _job_status=job_status)
    raise AssertionError(status)  # parse_query admits only STATUSES


def _owner_filter(owner: str) -> Q:
    if owner == SYSTEM_USERNAME:
        return Q(owner_id=SYSTEM_USER_ID)
    owner_id = selectors.parse_uuid(owner)
    return Q(owner_id=owner_id) if owner_id is not None else Q(owner__username=owner)


def workspace_page(*, user: User, query: Query) -> Page:
    """One page of the workspaces ``user`` may list (see the module's guarantees)."""
    queryset: QuerySet[Workspace] = selectors.workspace_queryset().order_by("created_at", "id")
    if not user.is_staff:
        queryset = queryset.filter(owner=user)
    if query.owner is not None:
        queryset = queryset.filter(_owner_filter(query.owner))
    if not _names_system_user(query.owner):
        queryset = queryset.exclude(owner_id=SYSTEM_USER_ID)
    if query.template_id is not None:
        queryset = queryset.filter(template_id=query.template_id)
    if query.status is None:
        queryset = queryset.filter(deleted=False)
    else:
        latest = WorkspaceBuild.objects.filter(workspace=OuterRef("pk")).order_by("-build_number")
        queryset = queryset.annotate(
            _transition=Subquery(latest.values("transition")[:1]),
            _job_status=Subquery(latest.values("job__status")[:1]),
        ).filter(_status_filter(query.status))
    if query.after is not None:
        created_at, ident = query.after
        queryset = queryset.filter(
            Q(created_at__gt=created_at) | Q(created_at=created_at, id__gt=ident)
        )
    rows = list(queryset[: query.limit + 1])
    if len(rows) <= query.limit:
        return Page(workspaces=rows, next_cursor=None)
    page = rows[: query.limit]
    return Page(workspaces=page, next_cursor=encode_cursor(page[-1]))


def _names_system_user(owner: str | None) -> bool:
    return owner is not None and (
        owner == SYSTEM_USERNAME or selectors.parse_uuid(owner) == SYSTEM_USER_ID
    )
