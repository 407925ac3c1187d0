"""Tensor parallelism on the CPU (gloo, one process per shard): which part of each weight a rank
holds, and the sharded engine token-exact to transformers for every family, with fewer KV heads
than shards, under preemption; prompt details and seeded sampling equal to one shard."""
import threading
from types import SimpleNamespace

import pytest
import torch

from on_the_fly_reference import greedy
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.models.config import ModelConfig
from textgen_backend.parallel import group as group_module
from textgen_backend.parallel.group import ShardGroup
from textgen_backend.parallel.layout import ShardLayout
from textgen_backend.sampling.params import DetailsParams, SamplingParams, StoppingParams
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit

PROMPTS = [[5, 17, 42, 9, 11], [3, 4], list(range(20, 60)), [7] * 9, [300, 12, 250]]


def _config(num_heads=4, num_kv_heads=2, vocab_size=10, head_dim=2) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=vocab_size, hidden_size=num_heads * head_dim,
        intermediate_size=8, num_layers=1, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None,
        max_position_embeddings=64, tie_word_embeddings=False, attention_bias=False,
        sliding_window=None, eos_token_ids=(1,), torch_dtype=None)


def _shards(config, world, name, tensor):
    return [ShardLayout(rank, world, config).shard(name, tensor) for rank in range(world)]


def test_column_and_row_parallel_parts_reassemble_the_whole():
    config = _config()
    q = torch.arange(8 * 8.).reshape(8, 8)          # 4 heads of 2 rows
    assert torch.equal(torch.cat(_shards(config, 2, "layers.0.self_attn.q_proj.weight", q)), q)
    o = torch.arange(8 * 8.).reshape(8, 8)
    assert torch.equal(torch.cat(_shards(config, 2, "layers.0.self_attn.o_proj.weight", o), 1),
                       o)
    up = torch.arange(8 * 8.).reshape(8, 8)
    parts = _shards(config, 4, "layers.0.mlp.up_proj.weight", up)
    assert [p[:, 0].tolist() for p in parts] == [[0, 8], [16, 24], [32, 40], [48, 56]]
    bias = torch.ones(8)  # a row-parallel bias is added once, by rank 0
    assert [p.sum().item() for p in _shards(config, 2, "layers.0.self_attn.o_proj.bias",
                                            bias)] == [8, 0]
    norm = torch.ones(8)
    assert all(p is norm for p in _shards(config, 2, "layers.0.input_layernorm.weight", norm))


def test_fewer_kv_heads_than_shards_replicates_the_head_of_each_ranks_queries():
    k = torch.arange(4.)[:, None].repeat(1, 8)     # 2 KV heads of 2 rows: rows 0-1, 2-3
    parts = _shards(_config(num_heads=4, num_kv_heads=2), 4, "layers.0.self_attn.k_proj.weight",
                    k)
    assert [p[:, 0].tolist() for p in parts] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    k1 = torch.arange(2.)[:, None].repeat(1, 8)    # one KV head: every rank holds it
    parts = _shards(_config(num_heads=4, num_kv_heads=1), 2, "layers.0.self_attn.v_proj.weight",
                    k1)
    assert [p[:, 0].tolist() for p in parts] == [[0, 1], [0, 1]]
    local = ShardLayout(1, 4, _config(num_heads=4, num_kv_heads=2)).local_config
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (1, 1, 2)


def test_vocabulary_parts_are_padded_to_equal_size():
    embed = torch.arange(10.)[:, None].repeat(1, 8)  # vocab 10 over 4 ranks: 3 rows each
    parts = _shards(_config(), 4, "embed_tokens.weight", embed)
    assert [p[:, 0].tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 0]]


def test_a_fused_checkpoint_projection_is_split_like_its_parts():
    config = _config()
    q, k, v = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
    layout = ShardLayout(1, 2, config)
    fused = layout.shard("layers.0.self_attn.qkv_proj.weight", torch.cat([q, k, v]))
    assert torch.equal(fused, torch.cat([layout.shard(f"layers.0.self_attn.{n}_proj.weight", t)
                                         for n, t in zip("qkv", (q, k, v))]))


@pytest.mark.parametrize("field,heads,kv,message", [
    ("num_attention_heads", 6, 2, "num_attention_heads (6) does not split evenly over 4"),
    ("num_key_value_heads", 4, 3, "num_key_value_heads (3) does not split evenly over 4"),
])
def test_uneven_splits_are_refused_naming_the_field(field, heads, kv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ShardLayout(0, 4, _config(num_heads=heads, num_kv_heads=kv))


@pytest.fixture(scope="module", params=[("llama", 2, 2), ("mistral", 2, 2), ("qwen2", 2, 2),
                                        ("llama", 1, 2), ("llama", 2, 4)],
                ids=["llama", "mistral", "qwen2", "one-kv-head-2-shards", "llama-4-shards"])
def family(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    name, kv_heads, shards = request.param
    model_dir = build_tiny_model(tmp_path_factory.mktemp(name), name, num_kv_heads=kv_heads)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, hf_model, shards


def _engine(model_dir, shards, **overrides):
    config = dict(model_id=str(model_dir), block_size=4, max_total_tokens=64,
                  max_batch_total_tokens=64, num_shard=shards, max_lora_rank=0)
    return Engine(EngineConfig(**{**config, **overrides}), model_dir)


def _run(engine, seqs):
    """Runs to completion; returns the prompt details each sequence got, by id."""
    for s in seqs:
        engine.add(s)
    details = {}
    while engine.has_work():
        details.update({o.seq_id: o.prompt_logprobs for o in engine.step() if o.prompt_logprobs})
    return details


def test_sharded_greedy_equals_transformers_under_preemption(family):
    model_dir, hf_model, shards = family
    engine = _engine(model_dir, shards)
    try:
        assert len(engine.shards.workers) == shards - 1
        seqs = [Sequence(i, p, SamplingParams(), StoppingParams(max_tokens=24))
                for i, p in enumerate(PROMPTS)]
        _run(engine, seqs)
        assert engine.scheduler.num_preemptions > 0
    finally:
        engine.close()
    for s in seqs:
        assert s.output_ids == greedy(hf_model, s.prompt_ids, 24), s.prompt_ids


def test_prompt_details_and_seeded_sampling_equal_one_shard(tmp_path):
    """Prompt logprobs need lm_head on every prompt position (each rank's vocabulary part);
    sampling happens on rank 0 from the gathered logits, with each row's own settings."""
    model_dir = build_tiny_model(tmp_path / "m", "llama")

    def requests():
        details = DetailsParams(input_details=True, top_n_tokens=3)
        return [Sequence(0, PROMPTS[0], SamplingParams(), StoppingParams(max_tokens=8),
                         details=details),
                Sequence(1, PROMPTS[2], SamplingParams(do_sample=True, temperature=0.8,
                                                       top_k=20, seed=7),
                         StoppingParams(max_tokens=8)),
                Sequence(2, PROMPTS[4], SamplingParams(do_sample=True, top_p=0.9, seed=3,
                                                       repetition_penalty=1.3),
                         StoppingParams(max_tokens=8))]

    outputs, details = {}, {}
    for shards in (1, 2):
        engine = _engine(model_dir, shards, max_total_tokens=128, max_batch_total_tokens=512)
        try:
            seqs = requests()
            details[shards] = _run(engine, seqs)[0]
            outputs[shards] = [s.output_ids for s in seqs]
        finally:
            engine.close()
    assert outputs[2] == outputs[1]
    details_one, details_two = details[1], details[2]
    assert details_two[0] is None and len(details_two) == len(PROMPTS[0])
    for a, b in zip(details_one[1:], details_two[1:]):
        assert b.rank == a.rank and b.logprob == pytest.approx(a.logprob, abs=1e-5)
        assert [t for t, _ in b.top] == [t for t, _ in a.top] and len(a.top) == 3


def test_sharded_adapters_equal_peft_for_each_row_through_slot_reuse(tmp_path):
    """Each rank holds its share of every adapter (B rows of q/k/v and gate/up, A columns of
    o and down; the one KV head's LoRA on both ranks); three adapters share two slots, so
    slots are reloaded on every rank while other rows run."""
    from lora_adapters import ATTENTION, MLP, PeftReference, save_random_lora
    from textgen_backend.adapters.catalog import AdapterCatalog

    model_dir = build_tiny_model(tmp_path / "model", "llama", num_kv_heads=1)
    adapters = {"attn": save_random_lora(model_dir, tmp_path / "attn", 4, ATTENTION, seed=1),
                "mlp": save_random_lora(model_dir, tmp_path / "mlp", 8, MLP, seed=2),
                "all": save_random_lora(model_dir, tmp_path / "all", 8, ATTENTION + MLP,
                                        seed=3)}
    reference = PeftReference(model_dir)
    engine = _engine(model_dir, 2, max_lora_rank=8, max_active_adapters=2,
                     adapter_source="local", adapter_cycle_time_s=0.05, max_total_tokens=128,
                     max_batch_total_tokens=1024)
    try:
        catalog = AdapterCatalog(engine.config, engine.model_config)
        plan = [None, "attn", "mlp", "all", "attn", "all"]
        seqs = [Sequence(i, PROMPTS[i % len(PROMPTS)], SamplingParams(),
                         StoppingParams(max_tokens=10, ignore_eos=True),
                         adapter=catalog.resolve(str(adapters[name]), "local", "")
                         if name else None) for i, name in enumerate(plan)]
        _run(engine, seqs)
        loads = engine.adapters.counters.loads
    finally:
        engine.close()
    assert loads > 2  # a slot was reloaded
    for s, name in zip(seqs, plan):
        expected = reference.greedy(adapters[name] if name else None, s.prompt_ids, 10)
        assert s.output_ids == expected, name
    assert seqs[1].output_ids != reference.greedy(None, seqs[1].prompt_ids, 10)


@pytest.mark.parametrize("variant", [
    dict(method="gptq"), dict(method="gptq", checkpoint_format="gptq_v2", sym=True,
                              group_size=-1),
    dict(method="gptq", bits=8, group_size=64), dict(method="awq")],
    ids=["gptq-g32", "gptq-v2-sym-g-1", "gptq-8bit-g64", "awq-g32"])
def test_sharded_quantized_checkpoints_equal_transformers_on_their_dequantized_twin(
        tmp_path, variant):
    """Packed words and groups split along with the projections (GPTQ packs the input rows,
    AWQ the output columns); a group of 64 spans both ranks' 32 inputs of o_proj."""
    from transformers import AutoModelForCausalLM

    from quant_checkpoints import write_quantized
    from textgen_backend.layers.quantized_linear import QuantizedLinear

    quant_dir, ref_dir = write_quantized(build_tiny_model(tmp_path / "m", "qwen2"), tmp_path,
                                         **variant)
    hf = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    engine = _engine(quant_dir, 2, max_total_tokens=128, max_batch_total_tokens=512)
    try:
        assert isinstance(engine.runner.model.layers[0].mlp.down_proj, QuantizedLinear)
        seqs = [Sequence(i, p, SamplingParams(), StoppingParams(max_tokens=16))
                for i, p in enumerate(PROMPTS[:3])]
        _run(engine, seqs)
    finally:
        engine.close()
    for s in seqs:
        assert s.output_ids == greedy(hf, s.prompt_ids, 16)


def test_quantized_splits_that_straddle_groups_or_words_are_refused(tmp_path):
    from quant_checkpoints import write_quantized

    model_dir = build_tiny_model(tmp_path / "m", "llama")
    act_order, _ = write_quantized(model_dir, tmp_path / "a", method="gptq", desc_act=True)
    with pytest.raises(ValueError, match=r"--num-shard 2: GPTQ act-order \(desc_act\) "
                                         "checkpoints are not sharded yet"):
        _engine(act_order, 2).close()
    g16, _ = write_quantized(model_dir, tmp_path / "b", method="gptq", group_size=48)
    with pytest.raises(ValueError, match="o_proj's 64 inputs split into parts of 32, across "
                                         "gptq groups of 48"):
        _engine(g16, 2).close()


def test_nvlink_multicast_is_off_in_the_servers_environment_unless_the_user_set_it():
    from textgen_backend.cli.tritonserver import server_environment

    env = server_environment({"PATH": "/bin", "NVSHMEM_DISABLE_NVLS": "0"})
    assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"],
            env["NVSHMEM_DISABLE_NVLS"]) == ("0", "1", "0")


_READER = """
import sys, torch.distributed as dist
from textgen_backend.parallel.channel import Mailbox
dist.init_process_group("gloo", init_method=sys.argv[1], rank=1, world_size=2)
box = Mailbox.attach(sys.argv[2], readers=1)
got = [box.receive(0, dist.group.WORLD) for _ in range(3)]
print(got[0], len(got[1]), got[2], flush=True)
box.close(unlink=False)
"""


def test_the_mailbox_keeps_the_order_when_a_call_goes_over_gloo():
    """Calls that fit go through shared memory; one larger than the mailbox goes over the
    process group, announced in the mailbox, and the reader still gets all three in order."""
    import socket
    import subprocess
    import sys

    import torch.distributed as dist
    from textgen_backend.parallel.channel import CAPACITY, Mailbox

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    box = Mailbox.create(readers=1)
    reader = subprocess.Popen([sys.executable, "-c", _READER, address, box.name],
                              stdout=subprocess.PIPE, text=True)
    dist.init_process_group("gloo", init_method=address, rank=0, world_size=2)
    try:
        for message in ("first", b"x" * (CAPACITY + 1), ("third", [1, 2])):
            box.send(message, dist.group.WORLD)
        out, _ = reader.communicate(timeout=60)
    finally:
        dist.destroy_process_group()
        box.close(unlink=True)
    assert out.split() == ["first", str(CAPACITY + 1), "('third',", "[1,", "2])"]


def test_soft_prompts_and_speculation_equal_one_shard(tmp_path):
    """Soft prompts' embeddings travel to the workers with the step (their rows replace the
    token embeddings on every rank); n-gram drafts are verified as extra rows of the step."""
    from soft_prompts import save_random_prompt_tuning
    from textgen_backend.prompt_tuning.store import PrefixStore

    model_dir = build_tiny_model(tmp_path / "m", "llama")
    save_random_prompt_tuning(model_dir, tmp_path / "store" / "four", 4, seed=1)
    prefixes = PrefixStore(str(tmp_path / "store"), 64)
    repeating = [5, 17, 42, 9, 11] * 4
    outputs, accepted = {}, {}
    for shards in (1, 2):
        engine = _engine(model_dir, shards, prefix_store_path=str(tmp_path / "store"),
                         speculate=2, max_total_tokens=128, max_batch_total_tokens=1024)
        try:
            seqs = [Sequence(i, prompt, SamplingParams(),
                             StoppingParams(max_tokens=12, ignore_eos=True),
                             prefix=prefixes.resolve(prefix))
                    for i, (prompt, prefix) in enumerate([(PROMPTS[0], "four"), (PROMPTS[0], ""),
                                                          (repeating, "")])]
            _run(engine, seqs)
            outputs[shards] = [s.output_ids for s in seqs]
            accepted[shards] = engine.speculator.counters.accepted_tokens
        finally:
            engine.close()
    assert outputs[2] == outputs[1]
    assert outputs[2][0] != outputs[2][1]  # the soft prompt changes the answer
    assert accepted[2] == accepted[1] > 0


def test_a_call_that_fails_as_a_worker_dies_reports_the_exit_not_the_broken_connection(
        monkeypatch):
    """A killed worker's peers see a reset connection before its watcher's wait() returns: the
    failure reported must still be the exit (CI once saw 'the ranks are out of step')."""
    monkeypatch.setattr(group_module, "_EXIT_GRACE_SECONDS", 1.0)
    reports = []
    group = object.__new__(ShardGroup)  # the failure path only: no processes to start
    worker = SimpleNamespace(returncode=None)
    group.size, group.workers, group._closing = 2, [worker], False
    group._reporting, group.on_failure = threading.Lock(), reports.append
    threading.Timer(0.3, lambda: setattr(worker, "returncode", -9)).start()
    group.call_failed("forward", RuntimeError("Connection reset by peer"))
    assert reports == ["tensor-parallel worker 1 of 2 exited (exit code -9); forward failed "
                       "on rank 0 (RuntimeError: Connection reset by peer)"]

    worker.returncode = None  # no worker exits: rank 0's own error is the cause
    group.call_failed("forward", RuntimeError("boom"))
    assert "forward failed on rank 0 (RuntimeError: boom)" in reports[1]
