"""Speculative decoding (--speculate), one run.

Mechanics, on one GPU: Llama-3-8B shape, bf16, random weights; `batch` sequences of 512 random
prompt tokens decode 128 tokens greedily. The drafts come from an oracle (the tokens a run
without drafts produced: acceptance ~100%, less where bf16 rounding differs between the
verification step and the decode graphs; the measured rate is printed) or are always wrong
(those tokens + 1). N = 0 is plain decoding (decode CUDA graphs).

Real acceptance: the demo model (SmolLM2-135M; `--demo DIR`, default `textgen demo-model`) on
input-grounded prompts (correct, summarize, extract from a given passage) at batch 1, n-gram
drafts N = 0, 3, 4, 5: acceptance, tokens per step, tokens/s (times mean something on a GPU
only; acceptance and tokens per step on any device).

    python bench/bench_speculative.py [--batches 1,8,32] [--drafts 1,2,3,4,5] [--tokens 128]
                                      [--skip mechanics|real] [--demo DIR]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import llama3_8b_dir, print_table, release_gpu_memory, step

PASSAGE = ("The lighthouse keeper climbed the narow stairs every evening at dusk, carying a "
           "small lamp and a notebook in wich he wrote down the color of the sea, the direction "
           "of the wind and the names of the ships that passed the rocks. In winter the storms "
           "came from the north and the ships were few; in summer the fishing boats came out "
           "at dawn and returned before noon, their decks full of silver fish.")
TASKS = (f"Rewrite this paragraph with the spelling mistakes corrected, changing nothing "
         f"else:\n\n{PASSAGE}",
         f"Summarize this paragraph in two sentences, reusing its words:\n\n{PASSAGE}",
         f"List every noun phrase of this paragraph, one per line, as written:\n\n{PASSAGE}")


def _speculator_module():
    import textgen_backend.speculation.speculator as module
    return module


def decode_run(engine, prompts, tokens: int, num_drafts: int, proposer) -> dict:
    """Decodes the prompts to `tokens` each with `num_drafts` drafts a step from proposer
    (None: no speculation); timing starts once every sequence has its first token."""
    from textgen_backend.engine.sequence import Sequence
    from textgen_backend.sampling.params import SamplingParams, StoppingParams

    speculator = engine.speculator
    if num_drafts:
        speculator.num_drafts = num_drafts
        _speculator_module().propose_ngram = proposer
    else:
        engine.speculator = None
    seqs = [Sequence(i, p, SamplingParams(), StoppingParams(max_tokens=tokens, ignore_eos=True))
            for i, p in enumerate(prompts)]
    for seq in seqs:
        engine.add(seq)
    while any(not s.output_ids for s in seqs):
        step(engine)
    before = engine.stats()
    first = sum(len(s.output_ids) for s in seqs)
    steps = 0
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    started = time.perf_counter()
    while engine.has_work():
        step(engine)
        steps += 1
    seconds = time.perf_counter() - started
    engine.speculator = speculator
    after = engine.stats()
    drafted = after.speculation_draft_tokens - before.speculation_draft_tokens
    accepted = after.speculation_accepted_tokens - before.speculation_accepted_tokens
    made = sum(len(s.output_ids) for s in seqs) - first
    return {"outputs": [s.output_ids for s in seqs], "seconds": seconds, "steps": steps,
            "tokens": made, "acceptance": accepted / drafted if drafted else float("nan")}


def _weight(projection) -> torch.Tensor:
    """A projection's dense weight, through a LoraProjection's base layer when wrapped."""
    while not hasattr(projection, "weight") and hasattr(projection, "base"):
        projection = projection.base
    return projection.weight


def deterministic_walk(model) -> None:
    """Random weights give near-flat logits, so bf16 rounding differences between a decode
    graph and a verification step flip the greedy token at most steps (the first H200 run: an
    oracle of the plain run's tokens landed 1-18% of its drafts). With the attention and MLP
    outputs zeroed (o_proj, down_proj: the same GEMMs at the same cost) and lm_head a
    permutation of the embeddings, the next token of t is perm^-1(t) by a wide margin: every
    path agrees, and an oracle's drafts land."""
    with torch.no_grad():
        for layer in model.layers:
            _weight(layer.self_attn.o_proj).zero_()
            _weight(layer.mlp.down_proj).zero_()
        model.norm.weight.fill_(1.0)
        embeddings = model.embed_tokens.weight
        perm = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(0))
        _weight(model.lm_head).copy_(embeddings[perm.to(embeddings.device)])


def mechanics(args) -> list[list]:
    from textgen_backend.config import EngineConfig
    from textgen_backend.engine.engine import Engine

    context = 512
    config = EngineConfig(model_id=str(llama3_8b_dir()), load_format="dummy", dtype="bfloat16",
                          max_input_tokens=context, max_total_tokens=context + args.tokens + 16,
                          max_batch_prefill_tokens=16384, speculate=max(args.drafts),
                          speculation_max_batch_size=max(args.batches), waiting_served_ratio=0.0)
    engine = Engine(config, config.model_id)
    deterministic_walk(engine.runner.model)
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batches:
        prompts = [rng.integers(0, 128000, context).tolist() for _ in range(batch)]
        decode_run(engine, prompts, 8, 0, None)  # warm-up
        plain = decode_run(engine, prompts, args.tokens, 0, None)
        base = plain["tokens"] / plain["seconds"]
        rows.append([batch, 0, "none", "", "1.00", f"{1e3 * plain['seconds'] / plain['steps']:.2f}",
                     f"{base:,.0f}", "1.00x"])
        continuation = {tuple(p[:16]): p + out for p, out in zip(prompts, plain["outputs"])}

        def oracle(histories, n, wrong=False):
            drafts = []
            for h in histories:
                full = continuation[tuple(h[:16])]
                drafts.append([(t + 1) % 128000 if wrong else t for t in full[len(h):len(h) + n]])
            return drafts

        for num_drafts in args.drafts:
            for name, proposer in (("oracle", oracle),
                                   ("always wrong", lambda h, n: oracle(h, n, wrong=True))):
                decode_run(engine, prompts, 8, num_drafts, proposer)  # warm-up: compiles
                run = decode_run(engine, prompts, args.tokens, num_drafts, proposer)
                tps = run["tokens"] / run["seconds"]
                rows.append([batch, num_drafts, name, f"{100 * run['acceptance']:.0f}%",
                             f"{run['tokens'] / run['steps'] / batch:.2f}",
                             f"{1e3 * run['seconds'] / run['steps']:.2f}", f"{tps:,.0f}",
                             f"{tps / base:.2f}x"])
    del engine
    release_gpu_memory()
    return rows


def real_acceptance(args) -> list[list]:
    from transformers import AutoTokenizer

    from textgen_backend.config import EngineConfig
    from textgen_backend.engine.engine import Engine

    demo = args.demo or subprocess.run(
        [str(Path(sys.executable).parent / "textgen"), "demo-model"], capture_output=True,
        text=True, check=True).stdout.strip().splitlines()[-1]
    tokenizer = AutoTokenizer.from_pretrained(demo)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": task}],
                                             add_generation_prompt=True) for task in TASKS]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    engine = Engine(EngineConfig(model_id=demo, max_total_tokens=1024, speculate=5), demo)
    import textgen_backend.speculation.ngram as ngram
    rows, base = [], None
    for num_drafts in [0] + [n for n in (3, 4, 5) if n <= max(args.drafts)]:
        runs = [decode_run(engine, [prompt], args.tokens, num_drafts, ngram.propose_ngram)
                for prompt in prompts]
        seconds = sum(r["seconds"] for r in runs)
        tokens = sum(r["tokens"] for r in runs)
        tps = tokens / seconds
        base = base or tps
        acceptance = [r["acceptance"] for r in runs if r["acceptance"] == r["acceptance"]]
        rows.append([num_drafts, f"{100 * np.mean(acceptance):.0f}%" if acceptance else "",
                     f"{tokens / sum(r['steps'] for r in runs):.2f}", f"{tps:,.1f}",
                     f"{tps / base:.2f}x"])
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")],
                        default=[1, 8, 32])
    parser.add_argument("--drafts", type=lambda v: [int(n) for n in v.split(",")],
                        default=[1, 2, 3, 4, 5])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--skip", choices=["mechanics", "real"], default=None)
    parser.add_argument("--demo", default=None, help="the demo model's directory")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"commit {commit or 'unknown'}; {device}")
    if args.skip != "mechanics":
        print_table(f"Mechanics: Llama-3-8B shape, bf16, 512-token prompts, {args.tokens} new "
                    "tokens, greedy", ["batch", "drafts N", "proposer", "acceptance",
                                       "tokens/step/seq", "ms/step", "tok/s", "vs N=0"],
                    mechanics(args))
    if args.skip != "real":
        print_table(f"Real acceptance: demo model, {len(TASKS)} input-grounded prompts, batch 1, "
                    f"{args.tokens} tokens, n-gram drafts ({device})",
                    ["drafts N", "acceptance", "tokens/step", "tok/s", "vs N=0"],
                    real_acceptance(args))


if __name__ == "__main__":
    main()
