"""GPTQ (act-order, asymmetric, v1 zero points) and AWQ checkpoints of a tiny Llama, packed by
the tests' own packer, served by tritonserver with --quantize; greedy output must equal
transformers running the dequantized weights (float32, token-exact)."""
from __future__ import annotations

import pytest

from conftest import Reference, _serve
from quant_checkpoints import write_quantized

pytestmark = pytest.mark.e2e

PROMPTS = ["The quick brown fox", "Café, naïve, jalapeño! Emoji 😀", "Paris"]
CHECKPOINTS = {
    "gptq": dict(method="gptq", bits=4, group_size=32, sym=False, desc_act=True,
                 checkpoint_format="gptq"),
    "awq": dict(method="awq", bits=4, group_size=128),
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def quantized(request, tiny_model_dir, tmp_path_factory):
    method = request.param
    quant_dir, ref_dir = write_quantized(tiny_model_dir, tmp_path_factory.mktemp(method),
                                         **CHECKPOINTS[method])
    for server in _serve(tmp_path_factory, f"{method}-server", model_id=str(quant_dir),
                         quantize=method, max_input_tokens=100, max_total_tokens=160):
        yield server, Reference(ref_dir)


def test_greedy_parity_with_transformers_on_dequantized_weights(quantized, client_for):
    server, reference = quantized
    client = client_for(server)
    for prompt in PROMPTS:
        expected = reference.greedy(reference.encode(prompt), 30)
        whole = client.generate(prompt, max_tokens=30)
        assert whole.output_ids == expected, prompt
        assert whole.text == reference.decode(expected)
        streamed = list(client.stream(prompt, max_tokens=30))
        assert [t for c in streamed for t in c.output_ids] == expected
        assert "".join(c.text for c in streamed) == whole.text
