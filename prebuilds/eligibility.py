"""A claimable prebuild, written once (DESIGN.md §1 "ready / eligible"): SQL pieces, no Django.

A prebuild is **claimable** when it is

1. owned by the system user and not deleted (``SYSTEM_OWNED``);
2. *running*: its latest build is a succeeded ``start`` (``RUNNING``);
3. on the active version of a template that is neither deleted nor deprecated (``ACTIVE``);
4. not expired: created after the preset's last invalidation and within its TTL
   (``NOT_EXPIRED``);
5. served by agents that are all there: at least one current agent, and every current agent
   reports ``ready`` **and** is connected — heard from within ``AGENT_DISCONNECT_TIMEOUT``
   (``agents_claimable``).

A running prebuild is **unhealthy** when one of its current agents has been gone — reported
``off``, ``shutting_down`` or ``start_error``, or not heard from — for longer than the grace
period ``UNHEALTHY_GRACE`` on top of that (``agents_summary``): it is never claimable, the
reconciler counts it apart and replaces it.

Every reader composes its statement from these pieces, so the rule has this one home: the claim
(``prebuilds.claims``, both paths), the reconciler's snapshot (``prebuilds.selectors``; the pure
core then applies rules 3 and 4 to the snapshot, and a property test checks that the core's
``eligible`` is what the claim can take), the preset page (``prebuilds.dashboard``), and the
test and benchmark harnesses (``claimable_counts_sql``). The module imports nothing from Django
so the harnesses can use it from processes that have no settings.

Aliases the pieces expect in the statement around them: ``w`` the workspace, ``latest`` its
latest build (``transition``, ``template_version_id``, ``preset_id``), ``j`` that build's job,
``t`` the template and ``p`` the preset; agents are read in subqueries of their own.
Parameters: ``%(disconnect_timeout)s`` and ``%(unhealthy_grace)s`` in seconds (``params``).
"""

from __future__ import annotations

from typing import Any

SYSTEM_USER_ID = "c42fdf75-3097-471c-8c33-fb52454d81c0"  # accounts.models.SYSTEM_USER_ID

# The constants are written into the text, not passed: the claim runs on a generic prepared
# plan, and only literal constants let the planner match the partial indexes defined with them
# (``workspace_prebuild``: the system user; ``agent_current_not_ready``: 'ready').
SYSTEM_OWNED = f"w.owner_id = '{SYSTEM_USER_ID}'::uuid AND NOT w.deleted"
RUNNING = "latest.transition = 'start' AND j.status = 'succeeded'"
ACTIVE = "NOT t.deleted AND NOT t.deprecated AND t.active_version_id = latest.template_version_id"
NOT_EXPIRED = """(p.last_invalidated_at IS NULL OR w.created_at >= p.last_invalidated_at)
  AND (p.invalidate_after IS NULL OR p.invalidate_after <= interval '0'
       OR {now} - w.created_at <= p.invalidate_after)"""

# Lifecycle states an agent reports on its way out (or after a failed start script): its
# workspace cannot serve anyone until it is started again.
GONE_STATES = ("off", "shutting_down", "start_error")


def _seconds(name: str) -> str:
    return f"make_interval(secs => %({name})s)"


def agent_connected(a: str, now: str = "now()") -> str:
    """Agent ``a`` was heard from within the disconnect timeout (never heard from: not)."""
    return f"COALESCE({a}.last_seen_at >= {now} - {_seconds('disconnect_timeout')}, false)"


def agent_claimable(a: str, now: str = "now()") -> str:
    """Agent ``a`` reports ``ready`` and is connected."""
    return f"{a}.lifecycle_state = 'ready' AND {agent_connected(a, now)}"


def agent_gone(a: str, now: str = "now()") -> str:
    """Agent ``a`` reported a leaving state longer than the grace period ago."""
    states = ", ".join(f"'{state}'" for state in GONE_STATES)
    since = f"COALESCE({a}.lifecycle_changed_at, {a}.created_at)"
    return f"{a}.lifecycle_state IN ({states}) AND {since} < {now} - {_seconds('unhealthy_grace')}"


def agent_lost(a: str, now: str = "now()") -> str:
    """Agent ``a`` has been disconnected longer than the grace period (a new agent that never
    reported counts from its creation, so it is given the same time to come up)."""
    seen = f"COALESCE({a}.last_seen_at, {a}.created_at)"
    return f"{seen} < {now} - {_seconds('disconnect_timeout')} - {_seconds('unhealthy_grace')}"


def agents_claimable(w: str = "w", now: str = "now()") -> str:
    """Workspace ``w`` has a current agent and every current agent is claimable.

    Three probes rather than one aggregate, for the claim's speed: "any agent not ready" is
    answered by the partial index ``agent_current_not_ready`` without reading a pool's (ready)
    agents; the other two read the workspace's few current agents (``agent_current``).
    """
    current = (
        f"FROM workspaces_workspaceagent a WHERE a.workspace_id = {w}.id AND a.retired_at IS NULL"
    )
    return f"""EXISTS (SELECT 1 {current})
  AND NOT EXISTS (SELECT 1 {current} AND a.lifecycle_state <> 'ready')
  AND NOT EXISTS (SELECT 1 {current} AND NOT ({agent_connected("a", now)}))"""


def agents_summary(workspace_id: str, now: str = "now()") -> str:
    """A subquery of one row over the current agents of ``workspace_id``: ``claimable`` (the
    same rule as ``agents_claimable``) and ``unhealthy_reason`` (NULL when healthy; otherwise
    ``agent_<state>`` for an agent gone that way, else ``agent_disconnected``).

    For readers that look at every prebuild (the snapshot, the preset page): one index probe
    per workspace.
    """
    return f"""SELECT COUNT(*) > 0 AND bool_and(COALESCE({agent_claimable("ag", now)}, false))
                   AS claimable,
               CASE WHEN bool_or({agent_gone("ag", now)})
                    THEN 'agent_' || min(ag.lifecycle_state) FILTER (WHERE {agent_gone("ag", now)})
                    WHEN bool_or({agent_lost("ag", now)}) THEN 'agent_disconnected'
               END AS unhealthy_reason
          FROM workspaces_workspaceagent ag
         WHERE ag.workspace_id = {workspace_id} AND ag.retired_at IS NULL"""


def claimable_where(now: str = "now()") -> str:
    """The whole rule, for a statement with the aliases of the module docstring."""
    return f"""{SYSTEM_OWNED}
  AND {RUNNING}
  AND {ACTIVE}
  AND {NOT_EXPIRED.format(now=now)}
  AND {agents_claimable("w", now)}"""


def inline(sql: str, values: dict[str, Any]) -> str:
    """``sql`` with the (numeric) ``params`` written in, for ORM ``RawSQL`` expressions, whose
    placeholders are positional. Only numbers are accepted, so nothing can be injected."""
    for name, value in values.items():
        sql = sql.replace(f"%({name})s", repr(float(value)))
    return sql


def params(*, disconnect_timeout: float, unhealthy_grace: float | None = None) -> dict[str, Any]:
    """The pieces' parameters; the grace period is the timeout unless given."""
    grace = disconnect_timeout if unhealthy_grace is None else unhealthy_grace
    return {"disconnect_timeout": float(disconnect_timeout), "unhealthy_grace": float(grace)}


# The joins that give the pieces their aliases, after a ``FROM`` of workspaces ``w``: ``latest``
# (the workspace's latest build), its job ``j``, the template ``t`` and the preset ``p``.
LATEST_BUILD_JOINS = """
JOIN LATERAL (
    SELECT b.build_number, b.template_version_id, b.preset_id, b.transition, b.job_id
    FROM workspaces_workspacebuild b
    WHERE b.workspace_id = w.id
    ORDER BY b.build_number DESC
    LIMIT 1
) latest ON true
JOIN workspaces_provisionerjob j ON j.id = latest.job_id
JOIN workspaces_template t ON t.id = w.template_id
JOIN workspaces_templateversionpreset p ON p.id = latest.preset_id
"""

# Claimable prebuilds per preset (latest build's), for harnesses and checks; needs ``params``.
CLAIMABLE_COUNTS_SQL = f"""
SELECT latest.preset_id, count(*)
FROM workspaces_workspace w
{LATEST_BUILD_JOINS}WHERE {claimable_where()}
GROUP BY latest.preset_id
"""
