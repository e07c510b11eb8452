"""HTTP framing Django does not do for us.

``NoContentMiddleware``: a ``204 No Content`` or ``304 Not Modified`` answer carries neither
``Content-Type`` nor ``Content-Length`` (RFC 9110 §8.6, §15.3.5). Django's ``HttpResponse``
defaults to ``text/html`` and ``CommonMiddleware`` adds ``Content-Length: 0``; clients that
check the framing (issue 18) saw both. First in ``MIDDLEWARE`` so it sees the answer last.
Sync and async without a thread hop (the reinit long-poll is an async view).
"""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

BODILESS_STATUSES = (204, 304)


def strip_body_headers(response: HttpResponseBase) -> HttpResponseBase:
    if response.status_code in BODILESS_STATUSES:
        for header in ("Content-Type", "Content-Length"):
            if response.has_header(header):
                del response[header]
    return response


class SyncAsyncMiddleware:
    """Base of a middleware that serves sync and async views alike without a thread hop (the
    reinit long-poll is an async view): a subclass writes ``_call`` and ``_acall``."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):
        if self.is_async:
            return self._acall(request)
        return self._call(request)


class NoContentMiddleware(SyncAsyncMiddleware):
    def _call(self, request: HttpRequest) -> HttpResponseBase:
        return strip_body_headers(self.get_response(request))

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        return strip_body_headers(await self.get_response(request))
