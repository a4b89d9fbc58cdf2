"""Pytest fixtures for the sandbox gateway (loaded by ``tests/conftest.py``).

Filled in by the sandbox work; until then it defines nothing.
"""
