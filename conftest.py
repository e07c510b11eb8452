"""Project-wide pytest set-up.

Tests run against a real PostgreSQL: the embedded one under DATA_DIR unless DATABASE_URL is set.
"""
