"""GPTQ (act-order, asymmetric, v1 zero points) and AWQ checkpoints of a tiny Llama, packed by
the tests' own packer, served by tritonserver with --quantize; greedy output must equal
transformers running the dequantized weights (float32, token-exact). Then the schemes that
quantize a dense checkpoint on the fly, against transformers quantized by the same formats."""
from __future__ import annotations

import pytest
import torch

from conftest import Reference, _serve
from on_the_fly_reference import quantize_reference
from quant_checkpoints import write_quantized
from textgen_backend.quantization.schemes import ON_THE_FLY

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


@pytest.fixture(scope="module", params=ON_THE_FLY)
def quantized_on_the_fly(request, tiny_model_dir, tmp_path_factory):
    """A dense checkpoint served with --quantize eetq / fp8 / bitsandbytes*; the reference is
    transformers with its projections quantized by the same formats."""
    from transformers import AutoModelForCausalLM

    scheme = request.param
    reference = Reference(tiny_model_dir)
    reference.model = quantize_reference(AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32).eval(), scheme)
    for server in _serve(tmp_path_factory, f"{scheme}-server", model_id=str(tiny_model_dir),
                         quantize=scheme, max_input_tokens=100, max_total_tokens=160):
        yield server, reference


def test_on_the_fly_schemes_match_transformers_quantized_alike(quantized_on_the_fly, client_for):
    server, reference = quantized_on_the_fly
    client = client_for(server)
    expected = [reference.greedy(reference.encode(p), 20) for p in PROMPTS]
    for prompt, tokens in zip(PROMPTS, expected):
        assert client.generate(prompt, max_tokens=20).output_ids == tokens, prompt
    batch = client.generate_batch(PROMPTS, max_tokens=20)  # rows of one batch, each as alone
    assert [r.output_ids for r in batch] == expected
