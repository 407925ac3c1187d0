"""The asyncio twin of TextgenClient.stream (tritonclient's grpc.aio), for servers that call the
ensemble from an event loop (textgen_api). Leaving the iteration early cancels the request."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio

from textgen_client.client import GenerationChunk, TextgenError, build_inputs, parse_response


class AsyncTextgenClient:
    def __init__(self, url: str = "localhost:8001", model: str = "ensemble"):
        self.model = model
        self._client = grpcclient_aio.InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready() and
                        await self._client.is_model_ready(self.model))
        except Exception:  # unreachable counts as not ready
            return False

    def stream(self, prompts: list[str], **params) -> AsyncIterator[GenerationChunk]:
        return self.stream_inputs(build_inputs(prompts, **params))

    async def stream_inputs(self, inputs: list[grpcclient.InferInput]
                            ) -> AsyncIterator[GenerationChunk]:
        async def requests():
            yield {"model_name": self.model, "inputs": inputs, "request_id": uuid.uuid4().hex,
                   "enable_empty_final_response": True}

        responses = self._client.stream_infer(requests())
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    finished = True
                    raise TextgenError(str(error))
                chunk, finished = parse_response(result)
                if chunk is not None:
                    yield chunk
                if finished:
                    return
        except grpc.RpcError as exc:  # the stream itself failed: no server there, or it went
            finished = True
            raise TextgenError(f"the gRPC stream failed: [{exc.code().name}] "
                               f"{exc.details()}") from None
        finally:
            if not finished:
                responses.cancel()

    async def tokenize(self, text: str) -> tuple[list[int], list[str], list[tuple[int, int]]]:
        """(ids, token strings, [start, end) character offsets) from the tokenizer model."""
        arrays = {"text_input": np.array([[text.encode()]], dtype=np.object_),
                  "return_tokens": np.array([[True]]), "return_offsets": np.array([[True]])}
        inputs = []
        for name, array in arrays.items():
            inputs.append(grpcclient.InferInput(name, list(array.shape),
                                                "BYTES" if name == "text_input" else "BOOL"))
            inputs[-1].set_data_from_numpy(array)
        try:
            result = await self._client.infer("tokenizer", inputs)
        except Exception as exc:
            raise TextgenError(str(exc)) from None
        count = int(result.as_numpy("token_count").reshape(-1)[0])
        ids = result.as_numpy("input_ids").reshape(-1)[:count].tolist()
        tokens = [t.decode() for t in result.as_numpy("tokens").reshape(-1)[:count]]
        offsets = result.as_numpy("offsets").reshape(-1, 2)[:count].tolist()
        return ids, tokens, [tuple(o) for o in offsets]
