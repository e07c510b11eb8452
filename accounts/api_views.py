"""Account endpoints of the JSON API."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from accounts.api import api_view


@api_view(("GET",))
def me(request: HttpRequest) -> JsonResponse:
    """Who the credentials belong to; handy to check a token."""
    user = request.api_user
    return JsonResponse(
        {
            "id": str(user.id),
            "username": user.username,
            "is_staff": user.is_staff,
            "organizations": [
                m.organization.slug for m in user.memberships.select_related("organization")
            ],
        }
    )
