"""HTTP client for the agent endpoints of the control plane (DESIGN.md §7).

Standard library only: this module runs inside workspaces, where only a bare
Python exists. Every method makes exactly one attempt; retrying is the
caller's decision (see ``agent.Agent``), so failures are classified here:

- ``TransientError``: connection failures, timeouts, 5xx, 408 and 429 — the
  same request may well succeed later;
- ``InvalidTokenError``: 401 — the token is invalid for good;
- ``UnexpectedResponseError``: any other answer the contract does not allow.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

USER_AGENT = "warmstart-agent/1"

MANIFEST_PATH = "/api/v2/workspaceagents/me/manifest"
LIFECYCLE_PATH = "/api/v2/workspaceagents/me/lifecycle"
REINIT_PATH = "/api/v2/workspaceagents/me/reinit"
HEARTBEAT_PATH = "/api/v2/workspaceagents/me/heartbeat"

LifecycleState = Literal["starting", "ready", "start_error", "shutting_down", "off"]

# How much longer than the server-side `wait` a reinit long-poll may take before
# the agent gives up on the connection (network latency, a slow proxy).
REINIT_TIMEOUT_MARGIN = 15.0

_TRANSIENT_STATUSES = frozenset({408, 425, 429})


class ControlPlaneError(Exception):
    """A request to the control plane did not get an answer the contract allows."""


class TransientError(ControlPlaneError):
    """The control plane was unreachable, timed out or answered 5xx/408/429."""


class InvalidTokenError(ControlPlaneError):
    """The control plane answered 401: the agent token is invalid for good."""


class UnexpectedResponseError(ControlPlaneError):
    """An answer outside the contract (status or body)."""


class ReinitEvent(TypedDict):
    workspace_id: str
    owner_id: str
    reason: str


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise UnexpectedResponseError(f"answer {self.status} is not JSON: {exc}") from exc


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would replay the Authorization header to wherever a redirect
    # points, possibly another host; the agent API never redirects, so a
    # redirect is an error (raised as HTTPError with the 3xx status).
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _describe_error_body(body: bytes) -> str:
    """The `detail` of a DESIGN.md §7 error document, else a short excerpt of the body."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and ("error" in document or "detail" in document):
        return f"{document.get('error', '')}: {document.get('detail', '')}".strip(": ")
    text = body[:200].decode("utf-8", errors="replace").strip()
    return text or "(empty body)"


class ControlPlaneClient:
    """One-attempt calls to the agent endpoints, authenticated with the agent token.

    The token is only ever sent in the ``Authorization`` header; it never
    appears in URLs, exceptions or log messages.
    """

    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout
        # Proxies from the environment are honoured (agents behind a corporate
        # proxy need them; NO_PROXY exempts local control planes).
        self._opener = urllib.request.build_opener(_RefuseRedirects())

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        timeout: float | None = None,
    ) -> Response:
        """Send one request; return a 2xx answer, raise ``ControlPlaneError`` for anything else."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._token}")
        request.add_header("Accept", "application/json")
        request.add_header("User-Agent", USER_AGENT)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as answer:
                response = Response(answer.status, answer.read())
        except urllib.error.HTTPError as exc:
            try:
                error_body = exc.read()
            except (OSError, http.client.HTTPException):
                error_body = b""
            response = Response(exc.code, error_body)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            # URLError wraps connection failures; timeouts and resets while
            # reading the answer arrive as bare OSError / HTTPException.
            reason = getattr(exc, "reason", None) or exc
            raise TransientError(f"{method} {path}: {reason}") from exc

        if 200 <= response.status < 300:
            return response
        detail = f"{method} {path}: HTTP {response.status} {_describe_error_body(response.body)}"
        if response.status == 401:
            raise InvalidTokenError(detail)
        if response.status >= 500 or response.status in _TRANSIENT_STATUSES:
            raise TransientError(detail)
        raise UnexpectedResponseError(detail)

    def get_manifest(self) -> dict[str, Any]:
        """The raw manifest; fetching it marks the agent initialised for the current owner."""
        document = self.request("GET", MANIFEST_PATH).json()
        if not isinstance(document, dict):
            raise UnexpectedResponseError(f"GET {MANIFEST_PATH}: manifest is not a JSON object")
        return document

    def post_lifecycle(self, state: LifecycleState, *, timeout: float | None = None) -> None:
        """Report one lifecycle state (the contract answers 204)."""
        self.request("POST", LIFECYCLE_PATH, body={"state": state}, timeout=timeout)

    def post_heartbeat(self) -> float | None:
        """Tell the control plane the agent is alive; answers the interval it asks for next
        (None when the answer does not say)."""
        document = self.request("POST", HEARTBEAT_PATH, body={}).json()
        interval = document.get("heartbeat_interval") if isinstance(document, dict) else None
        if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0:
            return float(interval)
        return None

    def wait_for_reinit(self, wait: int) -> ReinitEvent | None:
        """Long-poll the reinit endpoint for up to ``wait`` seconds.

        Returns the event only for a 200 with a JSON object, ``None`` for 204;
        any other 2xx (or a 200 with a body that is not an object) raises
        ``UnexpectedResponseError``, so nothing but a real 200 answer can lead
        to a re-initialisation.
        """
        path = f"{REINIT_PATH}?wait={wait}"
        response = self.request("GET", path, timeout=wait + REINIT_TIMEOUT_MARGIN)
        if response.status == 204:
            return None
        if response.status != 200:
            raise UnexpectedResponseError(f"GET {path}: unexpected HTTP {response.status}")
        document = response.json()
        if not isinstance(document, dict):
            raise UnexpectedResponseError(f"GET {path}: answer 200 is not a JSON object")
        return ReinitEvent(
            workspace_id=str(document.get("workspace_id", "")),
            owner_id=str(document.get("owner_id", "")),
            reason=str(document.get("reason", "")),
        )
