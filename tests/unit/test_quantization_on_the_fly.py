"""quantization/: the bitsandbytes formats byte for byte against the bitsandbytes library (its
CPU/default path), LLM.int8()'s matmul against the library's functions, the int8 and fp8
round-trip bounds, and the engine with each --quantize scheme token-exact against transformers
quantized the same way (tests/on_the_fly_reference.py)."""
from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from on_the_fly_reference import greedy, quantize_reference
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.models.config import ModelConfig
from textgen_backend.quantization import formats
from textgen_backend.quantization.schemes import ON_THE_FLY
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(96, 160), (10, 41)])  # the second ends in a partial block
def test_4bit_storage_is_bitsandbytes(quant_type, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=False,
                                                 quant_type=quant_type)
    ours = formats.quantize_4bit(w, quant_type)
    assert torch.equal(ours.data, packed.flatten())
    assert torch.equal(ours.absmax, state.absmax)
    codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 0xF], 1).flatten()
    table = bnb_functional.get_4bit_type(quant_type, device="cpu")
    n = w.numel()
    expected = table[codes[:n].long()] * state.absmax.repeat_interleave(64)[:n]
    assert torch.equal(formats.dequantize_4bit(ours, quant_type).flatten(), expected)


def test_int8_storage_and_llm_int8_matmul_are_bitsandbytes():
    """CB / SCB exactly; each row of the matmul as bitsandbytes computes that row alone (its
    outlier columns are the batch's: per row, a request's output does not depend on others)."""
    torch.manual_seed(0)
    w = torch.randn(96, 160)
    cb, scb, _ = bnb_functional.int8_vectorwise_quant(w.clone())
    ours_cb, ours_scb = formats.bnb_int8_rows(w)
    assert torch.equal(ours_cb, cb) and torch.equal(ours_scb, scb)
    x = torch.randn(7, 160) * 2.5          # some values past the threshold: outliers
    ours = formats.bnb_int8_matmul(x, ours_cb, ours_scb)
    with_outliers = 0
    for row in range(len(x)):
        alone = x[row:row + 1]
        ca, sca, columns = bnb_functional.int8_vectorwise_quant(alone.clone(), threshold=6.0)
        expected = bnb_functional.int8_mm_dequant(bnb_functional.int8_linear_matmul(ca, cb),
                                                  sca, scb).float()
        if columns is not None and len(columns):
            with_outliers += 1
            expected += alone[:, columns] @ (cb[:, columns].float() * scb[:, None] / 127).T
        torch.testing.assert_close(ours[row:row + 1], expected, atol=2e-2, rtol=2e-3)  # fp16
    assert with_outliers >= 2
    torch.testing.assert_close(formats.bnb_int8_matmul(x[2:5], ours_cb, ours_scb), ours[2:5],
                               rtol=0, atol=0)   # a row's result does not depend on the others
    assert (ours - x @ w.T).abs().max() < 1.0


@pytest.mark.parametrize("rows", [1, 5, 17, 40])
def test_the_served_llm_int8_matmul_equals_its_reference(rows):
    """torch._int_mm's int32 sums are exact, as the reference's float64 ones; what differs is
    the float32 scaling and the outliers' product over masked columns (no host sync)."""
    torch.manual_seed(rows)
    w = torch.randn(96, 160)
    cb, scb = formats.bnb_int8_rows(w)
    x = torch.randn(rows, 160) * 2.5       # some values past the threshold: outliers
    assert (x.abs() >= formats.BNB_INT8_THRESHOLD).any()
    served = formats.bnb_int8_linear(x, cb, scb)
    torch.testing.assert_close(served, formats.bnb_int8_matmul(x, cb, scb), rtol=1e-5,
                               atol=1e-4)
    torch.testing.assert_close(formats.bnb_int8_linear(x[:1], cb, scb), served[:1], rtol=1e-6,
                               atol=1e-5)  # a row's result does not depend on the others


def test_int8_and_fp8_round_trips_stay_within_their_steps():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q, scale = formats.quantize_int8_rows(w)
    assert ((formats.dequantize_int8_rows(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    q8, scale8 = formats.quantize_fp8_rows(w)
    back = q8.float() * scale8[:, None]
    normal = w.abs() >= scale8[:, None] * 2 ** -6         # e4m3's normal range
    assert ((back - w).abs() <= w.abs() / 16 + 1e-7)[normal].all()   # 3 mantissa bits
    x = torch.randn(5, 256)
    xq, x_scale = formats.quantize_fp8_rows(x)       # the scaled matmul is that product
    torch.testing.assert_close(formats.fp8_matmul(x, q8, scale8),
                               (xq.float() @ q8.float().T) * x_scale[:, None] * scale8[None, :])
    error = formats.fp8_matmul(x, q8, scale8) - x @ w.T
    assert error.norm() / (x @ w.T).norm() < 0.05   # e4m3 on both sides: ~3.5% here


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), "llama")


@pytest.mark.parametrize("scheme", ON_THE_FLY)
def test_the_engine_quantizes_on_the_fly_and_matches_transformers(tiny_model, scheme):
    from transformers import AutoModelForCausalLM

    engine = Engine(EngineConfig(model_id=str(tiny_model), quantize=scheme,
                                 max_input_tokens=50, max_total_tokens=100), tiny_model)
    reference = quantize_reference(AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32).eval(), scheme)
    prompts = [[5, 17, 42, 9, 11], list(range(20, 60))]
    seqs = [Sequence(i, p, SamplingParams(), StoppingParams(max_tokens=16, ignore_eos=True))
            for i, p in enumerate(prompts)]
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        engine.step()
    for seq in seqs:
        assert seq.output_ids == greedy(reference, seq.prompt_ids, 16), scheme
    quantized = [name for name, m in engine.runner.model.named_modules()
                 if type(m).__name__ in ("OnTheFlyQuantizedLinear", "QuantizedLinear")]
    assert len(quantized) == 4 * 2  # four projections in each of the two layers


def test_an_on_the_fly_scheme_refuses_a_prequantized_checkpoint(tiny_model, tmp_path):
    from quant_checkpoints import write_quantized

    gptq, _ = write_quantized(tiny_model, tmp_path / "gptq", "gptq")
    with pytest.raises(ValueError, match="already gptq-quantized"):
        Engine(EngineConfig(model_id=str(gptq), quantize="eetq"), gptq)


def test_an_fp8_kv_cache_serves_close_to_the_model_dtype_one(tiny_model):
    """--kv-cache-dtype fp8 on the CPU (the torch path; the kernels' fp8 reads and writes are
    tests/kernels): the caches are float8, and the prompt logprobs the model gives with them
    stay close to those with float32 caches."""
    from textgen_backend.sampling.params import DetailsParams

    def prompt_logprobs(kv_cache_dtype):
        engine = Engine(EngineConfig(model_id=str(tiny_model), kv_cache_dtype=kv_cache_dtype,
                                     max_input_tokens=60, max_total_tokens=100), tiny_model)
        seq = Sequence(0, list(range(20, 60)), SamplingParams(), StoppingParams(max_tokens=4),
                       details=DetailsParams(input_details=True))
        engine.add(seq)
        logprobs = []
        while engine.has_work():
            for output in engine.step():
                logprobs += [t.logprob for t in output.prompt_logprobs or [] if t is not None]
        caches = {k.dtype for k, _ in engine.runner.kv_caches}
        return caches, torch.tensor(logprobs)

    full_dtypes, full = prompt_logprobs("auto")
    fp8_dtypes, fp8 = prompt_logprobs("fp8")
    assert full_dtypes == {torch.float32} and fp8_dtypes == {torch.float8_e4m3fn}
    assert not torch.equal(full, fp8)                   # the cache did change the numbers
    # e4m3 keeps 3 mantissa bits: this random tiny model's logprobs (-4 to -11) move by ~0.1
    difference = (full - fp8).abs()
    assert difference.mean() < 0.2 and difference.max() < 1.0, difference


@pytest.mark.parametrize("fmt", ["compressed-tensors", "fp8"])
def test_published_fp8_checkpoints_are_read_and_served_as_fp8(tiny_model, tmp_path, fmt):
    """Detected without the flag; the weights we read equal what transformers reads from the
    same files (compressed-tensors' decompression, or its fine-grained fp8 dequantization); the
    engine serves them token-exact against transformers running the fp8 scheme on them."""
    from transformers import AutoModelForCausalLM

    from fp8_checkpoints import write_fp8_checkpoint
    from textgen_backend.quantization.fp8_checkpoint import (dequantize_fp8_weights,
                                                             read_fp8_checkpoint)
    from textgen_backend.weights.loading import iterate_weights

    checkpoint = write_fp8_checkpoint(tiny_model, tmp_path / fmt, fmt)
    found = read_fp8_checkpoint(checkpoint)
    assert found.format == fmt
    ours = dict(dequantize_fp8_weights(iterate_weights(checkpoint, "safetensors"), found.block))
    # transformers decompresses both on the CPU (compressed-tensors through its library, when
    # the model first runs)
    theirs = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    greedy(theirs, [5, 6, 7], 1)
    for name, weight in theirs.state_dict().items():
        if name in ours and name.endswith("_proj.weight"):
            assert weight.dtype == torch.float32
            torch.testing.assert_close(ours[name], weight, rtol=0, atol=0)
    dense_from_checkpoint = AutoModelForCausalLM.from_pretrained(tiny_model,
                                                                 dtype=torch.float32).eval()
    dense_from_checkpoint.load_state_dict(ours)   # the dense model of what we read
    reference = quantize_reference(dense_from_checkpoint, "fp8")
    engine = Engine(EngineConfig(model_id=str(checkpoint), max_input_tokens=50,
                                 max_total_tokens=100), checkpoint)
    seq = Sequence(0, list(range(20, 60)), SamplingParams(),
                   StoppingParams(max_tokens=16, ignore_eos=True))
    engine.add(seq)
    while engine.has_work():
        engine.step()
    assert seq.output_ids == greedy(reference, seq.prompt_ids, 16)
    with pytest.raises(ValueError, match=r"--quantize eetq, but .* holds fp8 \(.*\) weights: "
                                         "serve it with --quantize fp8 or without the flag"):
        Engine(EngineConfig(model_id=str(checkpoint), quantize="eetq"), checkpoint)


def test_fp8_weights_pair_with_their_scales_in_any_order():
    from textgen_backend.quantization.fp8_checkpoint import dequantize_fp8_weights

    q = torch.randn(4, 8).to(torch.float8_e4m3fn)
    stream = [("a.weight_scale", torch.tensor(2.0)), ("a.input_scale", torch.tensor(1.0)),
              ("b.weight", q), ("norm.weight", torch.ones(8)), ("a.weight", q),
              ("b.weight_scale", torch.full((4, 1), 0.5))]
    out = dict(dequantize_fp8_weights(stream))
    assert sorted(out) == ["a.weight", "b.weight", "norm.weight"]      # input_scale dropped
    assert torch.equal(out["a.weight"], q.float() * 2) and torch.equal(out["b.weight"],
                                                                       q.float() * 0.5)
    with pytest.raises(ValueError, match="without scales"):
        list(dequantize_fp8_weights([("c.weight", q)]))
    with pytest.raises(ValueError, match="fits neither"):
        list(dequantize_fp8_weights([("c.weight", q), ("c.weight_scale", torch.ones(3, 3))]))


def test_fp8_is_refused_at_start_on_gpus_without_it(tiny_model, monkeypatch):
    """--quantize fp8 and --kv-cache-dtype fp8 need compute capability 8.9 (a GPU's
    capability is faked here): refused naming the flag, before any weight loads."""
    from textgen_backend.engine import loading

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    gpu = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"--quantize fp8: this GPU \(compute capability "
                                         r"8\.0\) has no fp8 support; it needs 8\.9"):
        loading.require_fp8(gpu, "--quantize fp8")
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8: this GPU"):
        loading.kv_cache_dtype(EngineConfig(model_id="m", kv_cache_dtype="fp8"),
                               torch.bfloat16, gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    loading.require_fp8(gpu, "--quantize fp8")

    def refuse(device, what):
        raise ValueError(f"refused: {what}")
    monkeypatch.setattr(loading, "require_fp8", refuse)
    monkeypatch.setattr(loading, "iterate_weights", lambda *a: pytest.fail("weights loaded"))
    config = EngineConfig(model_id=str(tiny_model), quantize="fp8", max_lora_rank=0)
    with pytest.raises(ValueError, match="refused: --quantize fp8"):
        loading.load_model(config, ModelConfig.from_dir(tiny_model), tiny_model,
                           torch.device("cpu"), torch.float32)
