"""Triton glue for the tokenizer: text_input rows -> padded token ids (textgen_backend does the work)."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from textgen_backend.config import EngineConfig
from textgen_backend.params import RequestError
from textgen_backend.tokenizer import load_tokenizer, tokenize_batch
from textgen_backend.weights import resolve_model_dir


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        config = EngineConfig.from_json(parameters["engine_config"]["string_value"])
        model_dir = resolve_model_dir(config.model_id, config.revision, config.huggingface_hub_cache)
        self.tokenizer = load_tokenizer(model_dir)

    def execute(self, requests):
        responses = []
        for request in requests:
            texts = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
            chat = pb_utils.get_input_tensor_by_name(request, "apply_chat_template")
            chat = chat.as_numpy().reshape(-1) if chat is not None else np.zeros(len(texts), bool)
            if len(chat) not in (1, len(texts)):
                responses.append(_error(f"apply_chat_template has {len(chat)} rows but "
                                        f"text_input has {len(texts)}"))
                continue
            try:
                outputs = tokenize_batch(self.tokenizer, texts, np.broadcast_to(chat, texts.shape))
            except RequestError as exc:
                responses.append(_error(str(exc)))
                continue
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, array) for name, array in outputs.items()]))
        return responses


def _error(message):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
