"""Shared pieces of the benchmarks: the measured ceilings (roofline), the Llama-3-8B shape,
a synthetic tokenizer of its vocabulary size, and table printing."""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# The benchmarks start tritonserver with the e2e tests' harness (tests/server.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}


def llama3_8b_dir(**overrides) -> Path:
    """A model directory with Llama-3-8B's config.json (weights: --load-format dummy)."""
    model_dir = Path(tempfile.mkdtemp(prefix="llama3-8b-shape-"))
    (model_dir / "config.json").write_text(json.dumps({**LLAMA3_8B, **overrides}))
    return model_dir


def hf_llama3_8b():
    """HF transformers' LlamaForCausalLM of the same shape, random bf16 weights on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k != "architectures"})
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.pad_token_id = 0
    return model


def release_gpu_memory() -> None:
    """Returns what dropped references held, so the next contender starts from the same GPU."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def decode_headroom(batch: int, context: int, prefill_tokens: int) -> int:
    """Tokens a sequence may make beside a timed decode: the three warm-up steps, and one a step
    while the batch's later prompts are still prefilled (the first H100 run's batch of 128 saw
    24 of its rows finish inside the timed steps with 16)."""
    return 16 + -(-batch * context // prefill_tokens)


def time_decode(engine, batch: int, context: int, steps: int, rng) -> tuple[float, float]:
    """(ms per decode step, ms of the CUDA-graph replay alone) for `batch` sequences of
    `context` random prompt tokens; every sequence decodes in every timed step."""
    import triton.testing

    from textgen_backend.sampling.params import SamplingParams, StoppingParams
    from textgen_backend.engine.sequence import Sequence

    seqs = [Sequence(1000 * batch + i, [rng.randrange(128000) for _ in range(context)],
                     SamplingParams(), StoppingParams(
                         max_tokens=steps + decode_headroom(
                             batch, context, engine.config.max_batch_prefill_tokens),
                         ignore_eos=True))
            for i in range(batch)]
    graphs = engine.runner.decode_graphs
    graph_ms = []
    step_ms = decode_step_ms(engine, seqs, steps, lambda: graph_ms.append(triton.testing.do_bench(
        graphs.set.graphs[graphs.size_for(batch)].replay, warmup=10, rep=100, return_mode="median")))
    return step_ms, graph_ms[0]


def step(engine) -> None:
    """One engine step; one with nothing to run (prompts waiting for an adapter or a grammar)
    sleeps 1 ms, as the server's engine process does. A loop spinning on such steps holds the
    GIL that the loader thread needs: on the H200 one adapter load took ~30 s that way."""
    engine.step()
    if engine.last_step is None:
        time.sleep(0.001)


def decode_step_ms(engine, seqs: list, steps: int, before_drain=lambda: None) -> float:
    """ms per engine step while every one of `seqs` (max_tokens >= steps + 16) decodes; the
    prefills and three warm-up steps run first, `before_drain` runs while they still decode."""
    for seq in seqs:
        engine.add(seq)
    while any(not s.output_ids for s in seqs):  # prefills (and adapter loads, grammars)
        step(engine)
    for _ in range(3):
        step(engine)
    before = [len(s.output_ids) for s in seqs]  # chunked prefill starts rows a step or so apart
    with Timer() as t:
        for _ in range(steps):
            step(engine)
    made = [len(s.output_ids) - n for s, n in zip(seqs, before)]
    if any(m != steps for m in made):  # printed, not raised: the run's other tables still count
        stats = engine.stats()
        print(f"warning: in {steps} timed steps, rows made {sorted(set(made))} tokens "
              f"(mean {np.mean(made):.1f}); running {stats.num_running}, waiting "
              f"{stats.num_waiting}, KV blocks {stats.kv_blocks_used}/{stats.kv_blocks_total}, "
              f"preemptions {stats.num_preemptions}, finished "
              f"{sum(s.finish_reason is not None for s in seqs)}")
    before_drain()
    while engine.has_work():
        step(engine)
    return 1e3 * t.seconds / steps


def write_synthetic_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one word per id ("t0 t1 ..."): serving needs a tokenizer,
    and random weights need none better."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": f"t{LLAMA3_8B['eos_token_id']}",
         "model_max_length": 8192}))


def param_bytes(config: dict, dtype_bytes: int = 2) -> int:
    h, i, v, layers = (config["hidden_size"], config["intermediate_size"], config["vocab_size"],
                       config["num_hidden_layers"])
    kv = config["num_key_value_heads"] * config["head_dim"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    return dtype_bytes * (layers * per_layer + 2 * v * h + h)


def kv_bytes_per_token(config: dict, dtype_bytes: int = 2) -> int:
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * dtype_bytes


def measure_ceilings() -> dict:
    """Measured HBM bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300,
                                      return_mode="median")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"bandwidth": 2 * (1 << 30) / (copy_ms / 1e3), "flops": 2 * 8192**3 / (mm_ms / 1e3)}


def sharegpt_workload(count: int, seed: int = 0, max_len: int = 1024) -> list[tuple[int, int]]:
    """(input tokens, output tokens) pairs, lognormal like ShareGPT (mean ~200 in / ~180 out),
    clipped to [4, max_len]."""
    rng = np.random.default_rng(seed)
    inputs = rng.lognormal(math.log(200) - 0.5 * 0.9**2, 0.9, count)
    outputs = rng.lognormal(math.log(180) - 0.5 * 0.9**2, 0.9, count)
    clip = lambda x: int(min(max(round(x), 4), max_len))  # noqa: E731
    return [(clip(i), clip(o)) for i, o in zip(inputs, outputs)]


def synthetic_prompt(num_words: int) -> str:
    """A prompt of num_words distinct-looking words (about as many tokens for a big vocabulary)."""
    return " ".join(f"t{(7 * k) % 128000}" for k in range(num_words))


def read_metrics(metrics_url: str) -> str:
    import urllib.request

    return urllib.request.urlopen(metrics_url, timeout=10).read().decode()


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of `name` in Prometheus text: (labels, value)."""
    import re

    return [(dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value))
            for labels, value in re.findall(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.M)]


def engine_steps(text: str) -> dict:
    """{method: [steps, seconds in steps, seconds in forward, sequences]} from the server's
    tgi_batch_* series (metrics text): where the served engine spent the run."""
    totals: dict = {}
    for key, name in enumerate(("tgi_batch_inference_duration_count",
                                "tgi_batch_inference_duration_sum",
                                "tgi_batch_inference_forward_duration_sum",
                                "tgi_batch_inference_batch_size_sum")):
        for labels, value in metric_samples(text, name):
            totals.setdefault(labels["method"], [0.0] * 4)[key] += value
    return totals


def histogram_totals(text: str, names: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    """{histogram: (sum, count)} over all its label sets, from metrics text."""
    return {name: tuple(sum(value for _, value in metric_samples(text, f"{name}_{part}"))
                        for part in ("sum", "count"))
            for name in names}


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    sys.stdout.flush()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


class Timer:
    def __enter__(self):
        torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
