"""The varlen CUDA graphs' layouts on the CPU: prefill, mixed (decode rows beside prompt
chunks, padding decode rows between them) and verification shapes (every draft row), and the
rows each returns. Each graph's forward runs eagerly over its static input buffer, as its
replay would on the GPU; the engine's output (and Medusa's drafts, which come from the returned
hidden rows) must equal the engine's without graphs, token for token (float32)."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import textgen_backend.layers.ops as ops_module
import textgen_backend.speculation.speculator as speculator_module
from draft_oracle import oracle_drafts
from medusa_heads import add_random_medusa
from textgen_backend.config import EngineConfig
from textgen_backend.engine import cuda_graphs
from textgen_backend.engine.cuda_graphs import (DecodeGraphs, VarlenGraphs, VarlenShape,
                                                mixed_shapes, prefill_shapes, verify_shapes)
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit
BATCH_SIZES, TOKEN_COUNTS = (1, 2, 4, 8), (8, 16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("varlen_graphs") / "model", "llama")


def _padding_aware(ops: ops_module.Ops) -> ops_module.Ops:
    """The torch reference ops, taking padding as our kernels do: slot -1 stores nothing, tokens
    past cu_seqlens[-1] and sequences of context 0 are not attended (the references never see
    padding outside graphs, so they do not mask it: that would cost a host sync)."""
    def store_kv(k, v, k_cache, v_cache, slots):
        keep = slots >= 0
        ops.store_kv(k[keep], v[keep], k_cache, v_cache, slots[keep])

    def attention(q, k_cache, v_cache, cu_seqlens, context_lens, tables, *args):
        out, real = torch.zeros_like(q), int(cu_seqlens[-1])
        out[:real] = ops.paged_attention(q[:real], k_cache, v_cache, cu_seqlens, context_lens,
                                         tables, *args)
        return out

    def decode(q, k_cache, v_cache, context_lens, tables, *args):
        out, live = torch.zeros_like(q), context_lens > 0
        out[live] = ops.paged_attention_decode(q[live], k_cache, v_cache, context_lens[live],
                                               tables[live], *args)
        return out

    return dataclasses.replace(ops, store_kv=store_kv, paged_attention=attention,
                               paged_attention_decode=decode)


@pytest.fixture
def launched(monkeypatch):
    """The shapes replayed; a "replay" runs the graph's forward eagerly on its buffer."""
    shapes = []
    monkeypatch.setattr(ops_module, "TORCH_OPS", _padding_aware(ops_module.TORCH_OPS))

    def capture(self, forward, prepare):
        self.forward = forward

    def launch(self, shape):
        shapes.append(shape)
        with torch.inference_mode():
            return self.forward(shape)

    monkeypatch.setattr(cuda_graphs._GraphSet, "capture", capture)
    monkeypatch.setattr(cuda_graphs._GraphSet, "_launch", launch)
    return shapes


@pytest.fixture
def fed_into_graphs(monkeypatch):
    """(graph set's kind, rows) of each write of pending tokens into a graph's static buffer
    (async scheduling: input ids taken from the previous step's device output)."""
    fed = []
    write_rows = cuda_graphs.write_rows

    def recording(ids, rows, values):
        fed.append(len(rows))
        write_rows(ids, rows, values)

    monkeypatch.setattr(cuda_graphs, "write_rows", recording)
    return fed


def _engine(model_dir, graphs: bool, **overrides) -> Engine:
    config = dict(model_id=str(model_dir), max_input_tokens=100, max_total_tokens=160,
                  block_size=4, max_batch_prefill_tokens=16)
    engine = Engine(EngineConfig(**{**config, **overrides}), model_dir)
    if graphs:  # what capture_cuda_graphs builds on a GPU
        runner = engine.runner
        width = -(-engine.limits.max_total_tokens // engine.config.block_size)
        runner.prefill_graphs = VarlenGraphs(
            runner.model, prefill_shapes(TOKEN_COUNTS) + mixed_shapes(BATCH_SIZES, TOKEN_COUNTS),
            False, width, runner.device, None)
        runner.decode_graphs = DecodeGraphs(runner.model, BATCH_SIZES, width, runner.device, None)
        if engine.config.speculate:
            runner.verify_graphs = VarlenGraphs(
                runner.model, verify_shapes(BATCH_SIZES, engine.config.speculate), True, width,
                runner.device, None)
    return engine


def _run_waves(engine: Engine, seed: int = 0) -> list[list[int]]:
    """Prompts of 2-40 tokens arriving a few at a time while earlier ones decode (chunks of at
    most 16 tokens beside 1-7 decode rows), greedy."""
    rng = random.Random(seed)
    seqs = []
    for wave in range(4):
        for _ in range(rng.randrange(1, 4)):
            prompt = [rng.randrange(2, 400) for _ in range(rng.randrange(2, 41))]
            seqs.append(Sequence(len(seqs), prompt, SamplingParams(),
                                 StoppingParams(max_tokens=rng.randrange(6, 20),
                                                ignore_eos=True)))
            engine.add(seqs[-1])
        for _ in range(3):
            engine.step()
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


def _run_greedy(engine: Engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """Every prompt decoded to `tokens` tokens in one batch."""
    seqs = [Sequence(i, p, SamplingParams(), StoppingParams(max_tokens=tokens, ignore_eos=True))
            for i, p in enumerate(prompts)]
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prefill_mixed_and_decode_graphs_equal_eager_steps(model_dir, launched, fed_into_graphs,
                                                           async_scheduling):
    expected = _run_waves(_engine(model_dir, graphs=False, async_scheduling=False))
    assert _run_waves(_engine(model_dir, graphs=True, async_scheduling=async_scheduling)) == \
        expected
    varlen = [s for s in launched if isinstance(s, VarlenShape)]
    mixed = [s for s in varlen if s.decode_rows]
    assert mixed and any(s.decode_rows == 0 for s in varlen)
    assert len(varlen) < len(launched), "decode graphs replayed"
    # steps launched ahead take their sequences' newest tokens from the device, in graphs too
    assert bool(fed_into_graphs) == async_scheduling
    assert {s.decode_rows for s in mixed} >= {1, 2, 4}, "decode-row buckets, padded ones too"


def test_verification_graphs_equal_eager_steps(model_dir, launched, monkeypatch):
    prompts = [[random.Random(i).randrange(2, 400) for _ in range(5 + 7 * i)] for i in range(5)]
    reference = _run_greedy(_engine(model_dir, graphs=False), prompts, 24)
    oracle_drafts(monkeypatch, [p + out for p, out in zip(prompts, reference)])
    engine = _engine(model_dir, graphs=True, speculate=3)
    assert _run_greedy(engine, prompts, 24) == reference
    verified = [s for s in launched if s.max_seqlen_q == 4]
    assert len(verified) >= 5 and engine.stats().speculation_accepted_tokens > 0
    assert any(s.tokens < 4 * s.seqs for s in verified), "padding rows need no padding drafts"


def test_medusa_drafts_from_graph_hidden_rows_equal_eager_ones(model_dir, launched, tmp_path,
                                                               monkeypatch):
    medusa_dir = add_random_medusa(model_dir, tmp_path / "medusa", num_heads=3)
    drafted = []
    real_attach = speculator_module.Speculator.attach

    def attach(self, out):
        real_attach(self, out)
        drafted[-1].append(out.draft_ids)

    monkeypatch.setattr(speculator_module.Speculator, "attach", attach)
    outputs = []
    for graphs in (False, True):
        drafted.append([])
        outputs.append(_run_waves(_engine(medusa_dir, graphs=graphs, speculate=3), seed=1))
    assert outputs[0] == outputs[1]
    assert drafted[0] == drafted[1] and any(drafted[1])
    assert any(s.max_seqlen_q == 4 for s in launched), "verification graphs replayed"
