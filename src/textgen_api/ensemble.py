"""Running one ensemble request for an HTTP request: whole results, or chunks as they come;
either way the request is cancelled on the server (its KV freed) when the HTTP client goes."""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from starlette.requests import Request

from textgen_api.errors import ApiError, from_ensemble
from textgen_client import GenerationChunk, GenerationResult, TextgenError
from textgen_client.aio import AsyncTextgenClient
from textgen_client.client import merge

_DISCONNECT_POLL_SECONDS = 0.25


async def results(client: AsyncTextgenClient, request: Request, prompts: list[str],
                  validation_status: int, **params) -> dict[tuple[int, int], GenerationResult]:
    """{(row, sequence index): result} of a non-streamed request."""
    async def collect():
        merged: dict[tuple[int, int], GenerationResult] = {}
        async for chunk in chunks(client, prompts, validation_status, stream=False, **params):
            merge(merged.setdefault((chunk.batch_index, chunk.sequence_index),
                                    GenerationResult()), chunk)
        return merged

    task = asyncio.ensure_future(collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_SECONDS)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise asyncio.CancelledError("the client disconnected")


async def chunks(client: AsyncTextgenClient, prompts: list[str], validation_status: int,
                 **params) -> AsyncIterator[GenerationChunk]:
    """The ensemble's responses; closing this generator cancels the request."""
    params = {name: value for name, value in params.items() if value is not None}
    try:
        stream = client.stream(prompts, **params)
    except TypeError as error:  # a parameter of the wrong type, named
        raise ApiError(validation_status, str(error), "validation") from None
    async with contextlib.aclosing(stream) as responses:
        try:
            async for chunk in responses:
                yield chunk
        except TextgenError as error:
            raise from_ensemble(error, validation_status) from None


async def started(responses: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    """responses, once its first chunk has come: a request the ensemble refuses raises here,
    before the HTTP response starts, so it gets its error status rather than a 200 stream."""
    try:
        first = await responses.__anext__()
    except StopAsyncIteration:
        first = None

    async def replay():
        try:
            if first is not None:
                yield first
                async for chunk in responses:
                    yield chunk
        finally:
            await responses.aclose()

    return replay()


def sse(payload: dict | str) -> bytes:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def require(condition: bool, message: str, param: str, status: int) -> None:
    if not condition:
        raise ApiError(status, message, "validation", param)
