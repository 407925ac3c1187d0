"""Waiting for background loads (adapters, soft prompts) in tests that drive them directly."""
from __future__ import annotations

import time


def settle(poll, loading) -> list:
    """Calls poll() until loading() is empty; returns every failure poll reported."""
    failures = poll()
    for _ in range(400):
        if not loading():
            return failures
        time.sleep(0.005)
        failures += poll()
    raise AssertionError("background loads did not finish")
