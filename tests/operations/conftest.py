"""Fixtures of the operations scenarios: one migrated database to copy, one cluster per test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operations.cluster import (
    Cluster,
    Postgres,
    cluster_of,
    prepare_golden_database,
    short_tempdir,
)


@pytest.fixture(scope="session")
def golden_database() -> Iterator[Path]:
    """A migrated, stopped PostgreSQL data directory; each scenario runs on a copy of it."""
    root = short_tempdir("wsops-golden-")
    try:
        yield prepare_golden_database(root)
    finally:
        # Stopped by prepare_golden_database; make sure, then remove it.
        if (root / "pg" / "postmaster.pid").exists():
            Postgres(root / "pg").close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster(golden_database: Path) -> Iterator[Cluster]:
    """A scenario's own PostgreSQL and Redis; every process it starts is killed afterwards, and
    the test fails if any workspace agent of the scenario survives that."""
    with cluster_of(golden_database) as cluster:
        yield cluster
