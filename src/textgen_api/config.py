"""What the front end needs to know: where the ensemble is, what to call the model, who may call."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ApiConfig:
    triton_url: str = "localhost:8001"      # the ensemble's gRPC endpoint
    model_name: str = "textgen"             # the base model's id in /v1/models and /info
    adapters: tuple[str, ...] = ()          # adapter ids /v1/models lists (OpenAI `model`)
    host: str = "0.0.0.0"
    port: int = 3000                        # TGI's REST port
    api_key: str | None = None              # required as a bearer token on every route when set
    cors_allow_origin: tuple[str, ...] = ()
    payload_limit: int = 2_000_000          # bytes of a request body (TGI's --payload-limit)
    max_input_tokens: int | None = None     # reported by /info when the launcher knows them
    max_total_tokens: int | None = None
