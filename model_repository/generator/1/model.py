"""Triton glue for the generator: validates and enqueues into textgen_backend's
GenerationService, whose threads stream the responses back through a response sender."""
import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from textgen_backend.serving import contract
from textgen_backend.config import EngineConfig
from textgen_backend.serving.drain import DrainFiles
from textgen_backend.logs import configure_logging
from textgen_backend.serving.metrics import GENERATOR_METRICS, TritonMetrics
from textgen_backend.sampling.params import RequestError
from textgen_backend.serving.service import GenerationService

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonSink:
    """The service's ResponseSink over a Triton decoupled response sender."""

    def __init__(self, sender):
        self.sender = sender

    def send(self, response, error, final):
        if error is not None:
            reply = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
        else:
            reply = pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, array) for name, array in response.tensors().items()])
        self.sender.send(reply, flags=FINAL if final else 0)

    def is_cancelled(self):
        return self.sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        config = EngineConfig.from_json(parameters["engine_config"]["string_value"])
        configure_logging(config.json_output)
        self.service = GenerationService(config, TritonMetrics(pb_utils, GENERATOR_METRICS),
                                         drain=DrainFiles(Path(args["model_repository"])))

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request.get_response_sender())
            cancel = pb_utils.get_input_tensor_by_name(request, contract.CANCEL_ID.name)
            if cancel is not None:  # the detokenizer relaying a client's cancellation
                for seq_id in cancel.as_numpy().reshape(-1):
                    self.service.cancel(int(seq_id))
                sink.sender.send(flags=FINAL)
                continue
            inputs = {}
            for spec in contract.GENERATOR_INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
                if tensor is not None:
                    inputs[spec.name] = tensor.as_numpy()
            try:
                self.service.submit(inputs, sink)
            except RequestError as exc:
                sink.send(None, str(exc), True)
        return None

    def finalize(self):
        self.service.shutdown()
