"""Triton glue for the detokenizer: passes the generator's text deltas on as the public outputs,
and relays a client's cancellation to the generator (Triton does not tell a decoupled model
inside an ensemble that its client cancelled; this step is the first to see it)."""
from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils

from textgen_backend.serving import contract

# Sequence ids already relayed, remembered for this many: a cancelled stream's responses that
# were already on their way arrive here one by one, and relaying each again (a blocking call to
# the generator) slowed this single instance until cancellations arrived after generation ended.
_RELAYED_MEMORY = 4096


class TritonPythonModel:
    def initialize(self, args):
        self._relayed = OrderedDict()

    def execute(self, requests):
        responses = []
        for request in requests:
            if request.is_cancelled():
                # Relay, then answer as usual: an error here leaves the ensemble request
                # counted in flight forever (tritonserver then waits its exit timeout).
                self._relay_cancel(request)
            outputs = []
            for public in contract.DETOKENIZER_OUTPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, "_" + public.name)
                outputs.append(pb_utils.Tensor(public.name, tensor.as_numpy()))
            responses.append(pb_utils.InferenceResponse(outputs))
        return responses

    def _relay_cancel(self, request):
        seq_id = pb_utils.get_input_tensor_by_name(request, contract.SEQUENCE_ID.name).as_numpy()
        key = int(seq_id.reshape(-1)[0])
        if key in self._relayed:
            return
        self._relayed[key] = None
        if len(self._relayed) > _RELAYED_MEMORY:
            self._relayed.popitem(last=False)
        cancel = pb_utils.InferenceRequest(
            model_name="generator",
            inputs=[pb_utils.Tensor(contract.CANCEL_ID.name, seq_id.reshape(-1, 1).astype(np.uint64))],
            requested_output_names=[])
        for _ in cancel.exec(decoupled=True):
            pass
