"""Python client for textgen's Triton ensemble (gRPC streaming, on tritonclient)."""
from textgen_client.client import GenerationChunk, GenerationResult, TextgenClient, TextgenError

__all__ = ["GenerationChunk", "GenerationResult", "TextgenClient", "TextgenError"]
