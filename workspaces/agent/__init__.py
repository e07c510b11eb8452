"""The workspace agent program (``python -m workspaces.agent``).

Runs inside workspaces, so this package imports nothing from Django and
nothing outside the Python 3.11 standard library. Keep it that way: a test
imports it with ``python -S`` and fails on any other module.
"""
