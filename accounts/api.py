"""JSON API plumbing shared by every app: authentication and the error shape of DESIGN.md §7.

Errors are ``{"error": "<code>", "detail": "<human message>"}`` with a 4xx status. Views raise
``ApiError`` (or return ``error_response``); ``api_view`` turns it into the JSON answer.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from accounts import ratelimit, tokens
from accounts.models import ApiToken
from accounts.services import API_TOKEN_PREFIX, api_token_authenticate

TOO_LARGE_DETAIL = "Request body is too large."


class ApiError(Exception):
    """An error answered as JSON; ``status`` is the HTTP status (4xx)."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


def error_response(status: int, error: str, detail: str) -> JsonResponse:
    """The error answer; a 401 says which scheme to use (``WWW-Authenticate``, RFC 6750)."""
    response = JsonResponse({"error": error, "detail": detail}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="warmstart"'
    return response


def is_json_media_type(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` value is JSON: ``application/json`` (any parameters, e.g.
    ``charset``) or a ``+json`` suffix type."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def allowed_methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    """``methods`` with ``HEAD`` wherever ``GET`` is allowed (a HEAD is a GET without body:
    the servers, uvicorn and Django's test client, drop the body)."""
    if "GET" in methods and "HEAD" not in methods:
        return (*methods, "HEAD")
    return methods


def rate_limited_response(exc: ratelimit.RateLimited) -> JsonResponse:
    """429 in the API's error shape, with ``Retry-After`` (seconds)."""
    response = error_response(
        429,
        "rate_limited",
        f"Too many failed authentication attempts; try again in {exc.retry_after} seconds.",
    )
    response["Retry-After"] = str(exc.retry_after)
    return response


def api_token_hashes(key_id: str) -> list[str]:
    """Secret hashes of the API tokens issued under ``key_id``, revoked ones included (for the
    rate limiter: none means an unknown key id, a match a real token that is not a guess)."""
    return list(ApiToken.objects.filter(key_id=key_id).values_list("secret_hash", flat=True))


def api_token_attempt(request: HttpRequest):
    """``authenticate`` behind the failure limits of API tokens (accounts.ratelimit): raises
    ``RateLimited`` for a blocked key id (or a malformed token from a blocked address)."""
    token = tokens.bearer(request.headers.get("Authorization"))
    return ratelimit.token_attempt(
        request,
        ratelimit.API_TOKEN,
        tokens.split(token, API_TOKEN_PREFIX) if token else None,
        lambda: authenticate(request),
        hashes=api_token_hashes,
    )


def authenticate(request: HttpRequest):
    """The API caller: a bearer API token, else the session user. None when neither is valid.

    A request that sends ``Authorization`` is judged by the token alone: a bad token is a 401
    even when a session cookie is also present, so a client never acts as someone else silently.
    """
    header = request.headers.get("Authorization")
    if header is not None:
        token = tokens.bearer(header)
        return api_token_authenticate(token) if token else None
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated and not user.is_system:
        return user
    return None


def read_json(request: HttpRequest) -> dict[str, Any]:
    """The request body as a JSON object, or ApiError naming what is wrong.

    Never raises anything else: a body over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` is a 413 (whatever
    its type), a body whose ``Content-Type`` is not JSON (form-encoded, text/plain, none given)
    a 415, anything that is not a JSON object (including nesting deep enough to exhaust the
    parser's recursion, which ``json`` reports as ``RecursionError``) a 400.
    """
    try:
        raw = request.body
    except RequestDataTooBig:
        raise ApiError(413, "request_too_large", TOO_LARGE_DETAIL) from None
    declared = request.META.get("CONTENT_TYPE", "")
    # No body and no type is simply a missing body (the 400 below), not a wrong media type.
    if (declared or raw) and not is_json_media_type(declared):
        shown = declared or "none"
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json (got {shown[:60]}).",
        )
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"Request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "Request body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "Request body must be a JSON object.")
    return body


def method_not_allowed(methods: tuple[str, ...]) -> JsonResponse:
    """405 in the API's error shape, with the ``Allow`` header."""
    response = error_response(405, "method_not_allowed", f"Use one of: {', '.join(methods)}.")
    response["Allow"] = ", ".join(methods)
    return response


def api_view(
    methods: tuple[str, ...], *, staff: bool = False
) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Decorate a JSON API view: method check, authentication, ``ApiError`` handling.

    The view receives ``request`` with ``request.api_user`` set. Token-authenticated requests
    are exempt from CSRF (no ambient credential); session requests keep Django's CSRF check.
    ``HEAD`` is allowed wherever ``GET`` is.
    """
    methods = allowed_methods(methods)

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                return method_not_allowed(methods)
            try:
                # Counted per key id; a blocked key id's secret is not even looked at.
                user = api_token_attempt(request)
            except ratelimit.RateLimited as exc:
                return rate_limited_response(exc)
            if user is None:
                return error_response(
                    401, "unauthorized", "Missing or invalid credentials (Bearer API token)."
                )
            if staff and not user.is_staff:
                return error_response(403, "forbidden", "This endpoint is for staff only.")
            if "Authorization" not in request.headers and request.method not in (
                "GET",
                "HEAD",
                "OPTIONS",
            ):
                from django.middleware.csrf import CsrfViewMiddleware

                try:
                    # Reads request.POST for a form token: a huge form body raises here.
                    reason = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
                except RequestDataTooBig:
                    return error_response(413, "request_too_large", TOO_LARGE_DETAIL)
                if reason is not None:
                    return error_response(
                        403, "csrf_failed", "CSRF check failed for a session request."
                    )
            request.api_user = user
            return call_answering_errors(view, request, *args, **kwargs)

        return csrf_exempt(wrapper)

    return decorator


def call_answering_errors(
    view: Callable[..., HttpResponse], request: HttpRequest, *args: Any, **kwargs: Any
) -> HttpResponse:
    """Call ``view``; an ``ApiError`` it raises (or a body over the size limit) becomes the
    JSON error answer. Shared by every decorator of JSON endpoints (users' and agents')."""
    try:
        return view(request, *args, **kwargs)
    except ApiError as exc:
        return error_response(exc.status, exc.error, exc.detail)
    except RequestDataTooBig:
        return error_response(413, "request_too_large", TOO_LARGE_DETAIL)


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """The project's 404 handler: JSON under ``/api/``, Django's page everywhere else."""
    if request.path.startswith("/api/"):
        return error_response(404, "not_found", f"No API endpoint at {request.path}.")
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """``CSRF_FAILURE_VIEW``: under ``/api/`` the API's JSON 403 (every API view checks CSRF
    itself or needs none, so this is the net under a view added without ``api_view``), Django's
    page everywhere else."""
    if request.path.startswith("/api/"):
        return error_response(403, "csrf_failed", "CSRF check failed for a session request.")
    from django.views.csrf import csrf_failure as page

    return page(request, reason)
