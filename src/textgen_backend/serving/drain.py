"""Graceful shutdown: the supervisor (textgen-launcher, `textgen tritonserver`) asks the generator
to drain before it signals tritonserver.

Why not let tritonserver's own signal handling drain: tritonserver tells a Python model nothing
before unloading it, and once it is exiting, tritonserver 2.51 no longer delivers a decoupled
step's responses through the ensemble (the client's stream just stops, the request stays in
flight until the exit timeout). So the supervisor writes a request file into the generator's
model directory; the generator refuses new requests, lets those in flight finish until the
timeout, ends the rest with finish_reason "cancelled", and writes a done file; only then does
the supervisor signal tritonserver.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DrainFiles:
    directory: Path       # the generator's model directory in the rendered repository

    @property
    def _request(self) -> Path:
        return self.directory / "drain-requested"

    @property
    def _done(self) -> Path:
        return self.directory / "drained"

    def request(self, timeout_s: float) -> None:
        """Asks the generator to drain within timeout_s seconds."""
        partial = self._request.with_suffix(".tmp")
        partial.write_text(f"{timeout_s}\n")
        os.replace(partial, self._request)  # never seen half written

    def requested_timeout(self) -> float | None:
        """The drain timeout in seconds once a drain was requested, else None."""
        try:
            return float(self._request.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def mark_drained(self) -> None:
        self._done.touch()

    def is_drained(self) -> bool:
        return self._done.exists()

    def clear(self) -> None:
        """Forgets a previous run's drain (a repository rendered again, a model reloaded). Only
        files that exist: a repository mounted read-only (Kubernetes, KServe) has none, and
        unlinking there fails even for a missing file."""
        for path in (self._request, self._done):
            if path.exists():
                path.unlink()
