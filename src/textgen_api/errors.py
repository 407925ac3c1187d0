"""The ensemble's refusals as HTTP errors: overload -> 429, not serving (or not reachable) ->
503, a gRPC stream that broke otherwise -> 502, anything else the request's fault (TGI: 422,
OpenAI: 400). Each API shapes the body its clients parse."""
from __future__ import annotations

from dataclasses import dataclass

from textgen_client import TextgenError


@dataclass
class ApiError(Exception):
    status: int
    message: str
    kind: str            # TGI's error_type / OpenAI's error type
    param: str | None = None


def from_ensemble(error: TextgenError, validation_status: int) -> ApiError:
    message = str(error)
    lowered = message.lower()
    if "overloaded" in lowered:
        return ApiError(429, message, "overloaded")
    if ("shutting down" in lowered or "not running" in lowered or "unavailable" in lowered
            or "failed to connect" in lowered or "not ready" in lowered):
        return ApiError(503, message, "unavailable")
    if "the grpc stream failed" in lowered:  # not the request's fault
        return ApiError(502, message, "upstream")
    return ApiError(validation_status, message, "validation")
