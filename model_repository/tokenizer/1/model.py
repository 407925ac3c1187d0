"""Triton glue for the tokenizer: text_input rows -> padded token ids, and TGIS's Tokenize API
when called on its own (textgen_backend.serving.tokenizer does the work)."""
import json
import time

import triton_python_backend_utils as pb_utils

from textgen_backend.serving import contract
from textgen_backend.config import EngineConfig
from textgen_backend.logs import configure_logging
from textgen_backend.serving.metrics import (TOKENIZE_METRICS, MetricsPublisher, TritonMetrics,
                                             tokenize_updates)
from textgen_backend.sampling.params import RequestError
from textgen_backend.serving.tokenizer import check_parameters, load_tokenizer, tokenize_request
from textgen_backend.weights.loading import resolve_model_dir


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        config = EngineConfig.from_json(parameters["engine_config"]["string_value"])
        configure_logging(config.json_output)
        model_dir = resolve_model_dir(config.model_id, config.revision, config.huggingface_hub_cache)
        self.tokenizer = load_tokenizer(model_dir, config.tokenizer_config_path,
                                        config.trust_remote_code)
        self.metrics = MetricsPublisher(TritonMetrics(pb_utils, TOKENIZE_METRICS))

    def execute(self, requests):
        responses = []
        for request in requests:
            started = time.monotonic()
            try:
                check_parameters(request.parameters())
                outputs = tokenize_request(self.tokenizer, _inputs(request))
            except RequestError as exc:
                if len(requests) == 1:
                    # Only a raised error counts in nv_inference_request_failure (an error
                    # response counts as a success). It fails every request of this call:
                    # config.pbtxt has no dynamic batching, so that is this one alone.
                    raise pb_utils.TritonModelException(str(exc)) from None
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            lengths = outputs["_input_lengths"]
            self.metrics.publish(tokenize_updates(len(lengths), int(lengths.sum()),
                                                  time.monotonic() - started))
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, array) for name, array in outputs.items()]))
        return responses

    def finalize(self):
        self.metrics.close()


def _inputs(request):
    inputs = {}
    for spec in contract.TOKENIZER_INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
        if tensor is not None:
            inputs[spec.name] = tensor.as_numpy()
    return inputs
