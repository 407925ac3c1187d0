"""Triton glue for the detokenizer: passes the generator's text deltas on as the public outputs,
and relays a client's cancellation to the generator (Triton does not tell a decoupled model
inside an ensemble that its client cancelled; this step is the first to see it)."""
import numpy as np
import triton_python_backend_utils as pb_utils

from textgen_backend import contract


class TritonPythonModel:
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
        cancel = pb_utils.InferenceRequest(
            model_name="generator",
            inputs=[pb_utils.Tensor(contract.CANCEL_ID.name, seq_id.reshape(-1, 1).astype(np.uint64))],
            requested_output_names=[])
        for _ in cancel.exec(decoupled=True):
            pass
