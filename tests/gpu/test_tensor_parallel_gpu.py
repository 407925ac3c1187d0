"""--num-shard on several GPUs of one host (NCCL; every rank replays the same CUDA graphs):
greedy decoding at 2 and 4 shards against one shard on the same weights. bfloat16: at the first
mismatch each side's token must be among the other's top 5 (the shards sum their partial
products in another order); float32: token-exact but for at most two sequences (held to the
same rule). Skipped below two GPUs."""
import pytest
import torch

from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from greedy_parity import first_mismatch, record_top5
from tiny_models import build_tiny_model

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 2, reason="needs two or more GPUs")]

NEW_TOKENS = 40
SHARDS = [n for n in (2, 4) if n <= GPUS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 128; 2 KV heads: at 4 shards each is held by two ranks
    return build_tiny_model(tmp_path_factory.mktemp("tp-gpu"), "llama", hidden_size=1024,
                            num_layers=4, num_heads=8, num_kv_heads=2, initializer_range=0.05,
                            max_position_embeddings=1024)


def generate(model_dir, dtype, shards, monkeypatch):
    """{seq_id: (output ids, top-5 ids at each step)} for prompts of assorted lengths, in one
    batch (decode steps through the CUDA graphs)."""
    recorded = record_top5(monkeypatch)
    engine = Engine(EngineConfig(model_id=str(model_dir), dtype=dtype, num_shard=shards,
                                 max_batch_total_tokens=100_000), model_dir)
    try:
        assert engine.runner.decode_graphs is not None
        g = torch.Generator().manual_seed(0)
        vocab = engine.model_config.vocab_size
        seqs = [Sequence(i, torch.randint(2, vocab, (n,), generator=g).tolist(),
                         SamplingParams(), StoppingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
                for i, n in enumerate([1, 17, 130, 300, 700] * 4)]
        for s in seqs:
            engine.add(s)
        while engine.has_work():
            engine.step()
    finally:
        engine.close()
        del engine
        torch.cuda.empty_cache()
    return {s.seq_id: (s.output_ids, recorded[s.seq_id]) for s in seqs}


@pytest.mark.parametrize("shards", SHARDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_sharded_greedy_agrees_with_one_shard(model_dir, dtype, shards, monkeypatch):
    one = generate(model_dir, dtype, 1, monkeypatch)
    sharded = generate(model_dir, dtype, shards, monkeypatch)
    exact = 0
    for seq_id, (theirs, their_top5) in one.items():
        ours, our_top5 = sharded[seq_id]
        i = first_mismatch(ours, theirs)
        exact += i is None
        if i is not None:
            assert ours[i] in their_top5[i] and theirs[i] in our_top5[i], (seq_id, i)
    print(f"{dtype}, {shards} shards: {exact}/{len(one)} sequences token-exact to one shard")
    if dtype == "float32":
        assert exact >= len(one) - 2
