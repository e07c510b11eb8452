"""The load steps count every answer that is not the one they expect as an error.

The first tests drive a step against a loopback server of their own that answers one fixed
status, so what a step does with a redirect (the bug: a dashboard step whose session the web
process did not accept got 302s to the login page and reported no errors) is checked without
a web process. The last one runs the load module at a tiny scale against a real web process
and checks that its staff session is accepted there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks import load
from benchmarks.claim import command_preset
from benchmarks.processes import free_port
from tests.benchmarks.test_benchmark_smoke import _bench_processes


@contextmanager
def answering(status: int) -> Iterator[str]:
    """A loopback HTTP server answering every GET with ``status``; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the web process

        def do_GET(self) -> None:
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "/login/?next=/prebuilds/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/prebuilds/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def step(url: str, expected: set[int]) -> dict:
    return asyncio.run(
        load.get_step(url, concurrency=2, seconds=0.3, expected=expected, prefix="step")
    )


def test_it_counts_every_redirect_as_an_error():
    with answering(302) as url:
        result = step(url, {200})

    assert result["step_requests"] > 0
    assert result["step_errors"] == result["step_requests"]
    assert result["step_5xx"] == 0
    assert result["step_statuses"] == {"302": result["step_requests"]}


def test_it_counts_no_error_when_every_answer_is_expected():
    with answering(204) as url:
        result = step(url, {200, 204})

    assert result["step_requests"] > 0
    assert result["step_errors"] == 0


def test_it_counts_5xx_answers_both_as_5xx_and_as_errors():
    with answering(503) as url:
        result = step(url, {200})

    assert result["step_requests"] > 0
    assert result["step_5xx"] == result["step_errors"] == result["step_requests"]


def test_it_counts_requests_that_got_no_answer_as_errors():
    url = f"http://127.0.0.1:{free_port()}/prebuilds/"  # nothing listens there

    result = step(url, {200})

    assert result["step_requests"] > 0
    assert result["step_errors"] == result["step_requests"]
    assert result["step_5xx"] == 0  # no answer is not a 5xx answer


@pytest.mark.django_db(transaction=True)
def test_the_dashboard_steps_use_a_session_the_web_process_accepts():
    results = load.measure(seconds=0.5, concurrency=(2,), pool=200, other_presets=2)

    assert results["load_whole_system"] is False
    for step_ in ("claim", "me", "dashboard", "dashboard_full"):
        assert results[f"load_{step_}_2_requests"] > 0, step_
        assert results[f"load_{step_}_2_errors"] == 0, (step_, results)
    # Nothing changed meanwhile: every poll was answered "no change" from the shared overview.
    assert set(results["load_dashboard_2_statuses"]) == {"204"}
    assert not _bench_processes()


@pytest.mark.django_db(transaction=True)
def test_a_claim_answered_with_a_cold_build_is_an_error_of_the_claim_step():
    # A pool of 2 for two clients claiming back to back: the pool runs dry at once, and every
    # later 201 is a cold build, which must not pass for a claim.
    results = load.measure(seconds=0.5, concurrency=(2,), pool=2, other_presets=0)

    missed = results["load_claim_2_missed"]
    assert missed == results["load_claim_2_requests"] - 2 > 0
    assert results["load_claim_2_errors"] == missed
    assert results["load_claim_2_statuses"] == {"201-missed": missed, "201": 2}
    assert results["load_claim_2_5xx"] == 0


@pytest.mark.django_db(transaction=True)
def test_the_dashboard_shows_the_load_modules_pools_alone_whatever_ran_before():
    # What an earlier module leaves behind (the reconcile measurement's 1,000 presets) must not
    # end up in the dashboard's figures.
    command_preset("left-behind", 3)

    results = load.measure(seconds=0.3, concurrency=(2,), pool=20, other_presets=2)

    assert results["load_dashboard_pools"] == 3
    assert results["load_dashboard_2_errors"] == 0
