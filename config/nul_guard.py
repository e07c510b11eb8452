"""Refuse text PostgreSQL cannot store: a NUL character anywhere in a request's input is a 400.

PostgreSQL ``text`` and ``jsonb`` cannot hold ``\\x00``; a NUL that reached a query used to end
in a 500 (``GET /workspaces/?owner=%00``). Rather than guard every field of every view, this
middleware looks once at what views read: the query string's names and values, form fields
(urlencoded or multipart, files aside) and the strings of a JSON body (names included). Paths
are left alone: ids in paths are parsed by the views (a NUL id is a 404 like any unknown id).

Answers: JSON ``{"error": "bad_request", "detail": …}`` under ``/api/`` (DESIGN.md §7), a plain
text 400 page elsewhere. Cost on clean requests: substring searches only; a body is parsed
here only when it contains a NUL or its escape (``%00``, ``\\u0000``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse

from config.http import SyncAsyncMiddleware

NUL = "\x00"
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def _json_has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return NUL in value
    if isinstance(value, dict):
        return any(NUL in key or _json_has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_json_has_nul(item) for item in value)
    return False


def _first_with_nul(items: Iterable[tuple[str, list[Any]]]) -> str | None:
    """The name of the first field whose name or a string value holds a NUL."""
    for name, values in items:
        if NUL in name or any(isinstance(value, str) and NUL in value for value in values):
            return name
    return None


def nul_field(request: HttpRequest) -> str | None:
    """Where ``request`` carries a NUL character (``query parameter 'owner'``), or None.

    A body that cannot be read or parsed is left to the view (which answers 413 or 400 as it
    always has): this check only ever refuses, it never changes what a view sees.
    """
    query = request.META.get("QUERY_STRING", "")
    if "%00" in query or NUL in query:
        name = _first_with_nul(request.GET.lists())
        if name is not None:
            return f"query parameter {_shown(name)}"
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return None
    try:
        body = request.body
    except Exception:  # too large, or the stream is gone: the view answers it
        return None
    content_type = request.content_type or ""
    if content_type in FORM_TYPES:
        # Multipart is not percent-encoded: only a raw NUL can be there.
        if b"\x00" in body or (content_type == FORM_TYPES[0] and b"%00" in body):
            try:
                name = _first_with_nul(request.POST.lists())
            except Exception:  # a malformed form: the view (or CSRF check) answers it
                return None
            if name is not None:
                return f"form field {_shown(name)}"
        return None
    if b"\x00" in body:
        return "request body"
    if b"\\u0000" in body:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if _json_has_nul(document):
            return "JSON body"
    return None


def _shown(name: str) -> str:
    return repr(name.replace(NUL, "\\x00")[:60])


def bad_request(request: HttpRequest, where: str) -> HttpResponse:
    detail = f"The {where} contains a NUL character (\\x00), which cannot be stored."
    if request.path.startswith("/api/"):
        return JsonResponse({"error": "bad_request", "detail": detail}, status=400)
    return HttpResponseBadRequest(
        f"Bad request: {detail}\n", content_type="text/plain; charset=utf-8"
    )


class NulGuardMiddleware(SyncAsyncMiddleware):
    """Answer 400 to a request carrying a NUL character (see the module docstring).

    Sync and async: the agents' reinit long-poll is an async view and must not be moved to a
    thread by a sync-only middleware.
    """

    def _call(self, request: HttpRequest) -> HttpResponse:
        where = nul_field(request)
        if where is not None:
            return bad_request(request, where)
        return self.get_response(request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        # The ASGI handler has read the body before building the request: no I/O here.
        where = nul_field(request)
        if where is not None:
            return bad_request(request, where)
        return await self.get_response(request)
