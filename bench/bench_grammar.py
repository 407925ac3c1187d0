"""Structured output cost on Llama-3-8B's shape (bf16, random weights), one GPU, one run: decode
ms per step at batch 64 with no row constrained vs every row following a nested JSON schema,
and llguidance's compile time over 50 varied schemas.

The tokenizer is a real one given by --tokenizer (default: the demo model's, 49k tokens; the
model's other ids are never allowed), since the mask cost grows with the vocabulary. Random
weights would wander inside the schema forever, so rows keep generating (no EOS) and the step
time is what is compared.

    python bench/bench_grammar.py [--tokenizer DIR] [--batch 64] [--steps 64]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import decode_step_ms, llama3_8b_dir, print_table

NESTED = {"type": "object", "additionalProperties": False, "required": ["id", "items"],
          "properties": {"id": {"type": "integer", "minimum": 0},
                         "items": {"type": "array", "maxItems": 1000, "items": {
                             "type": "object", "required": ["name", "tags"],
                             "additionalProperties": False,
                             "properties": {"name": {"type": "string"},
                                            "tags": {"type": "array",
                                                     "items": {"enum": ["a", "b", "c"]}}}}}}}


def decode_ms(engine, batch: int, steps: int, grammar) -> float:
    from textgen_backend.engine.sequence import Sequence
    from textgen_backend.sampling.params import SamplingParams, StoppingParams

    return decode_step_ms(engine, [
        Sequence(i + (10_000 if grammar else 0), list(range(100, 612)), SamplingParams(),
                 StoppingParams(max_tokens=steps + 16, ignore_eos=True), grammar=grammar)
        for i in range(batch)], steps)


def main():
    from transformers import AutoTokenizer

    from json_schemas import varied_schemas  # tests/ (common.py puts it on the path)
    from textgen_backend.config import EngineConfig
    from textgen_backend.engine.engine import Engine
    from textgen_backend.sampling.grammar import GrammarMatchers, grammar_from_request

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    tokenizer_dir = args.tokenizer or subprocess.run(
        [str(Path(sys.executable).parent / "textgen"), "demo-model"], capture_output=True,
        text=True, check=True).stdout.strip()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_dir = llama3_8b_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tokenizer_dir) / name).exists():
            (model_dir / name).write_bytes((Path(tokenizer_dir) / name).read_bytes())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    engine = Engine(EngineConfig(model_id=str(model_dir), load_format="dummy", dtype="bfloat16",
                                 max_input_tokens=1024, max_total_tokens=2048,
                                 max_batch_prefill_tokens=8192, max_concurrent_requests=512),
                    model_dir)
    nested = grammar_from_request({"guided_json": NESTED}, True)
    free_ms = decode_ms(engine, args.batch, args.steps, None)
    constrained_ms = decode_ms(engine, args.batch, args.steps, nested)
    print(f"commit {commit or 'unknown'}; tokenizer {tokenizer_dir} ({len(tokenizer)} tokens)")
    print_table(f"Decode, batch {args.batch}", ["rows", "ms/step", "vs free"],
                [["unconstrained", f"{free_ms:.2f}", "1.00x"],
                 ["all constrained (nested JSON schema)", f"{constrained_ms:.2f}",
                  f"{constrained_ms / free_ms:.2f}x"]])
    matchers = GrammarMatchers(tokenizer, engine.model_config.vocab_size)
    compile_ms = []
    for schema in varied_schemas(50):
        grammar = grammar_from_request({"guided_json": schema}, True)
        started = time.perf_counter()
        matchers.masks([matchers.compile(grammar)])  # llguidance's lazy work: the first mask
        compile_ms.append(1e3 * (time.perf_counter() - started))
    print_table("Compile + first mask, 50 varied schemas (ms)", ["p50", "p99", "max"],
                [[f"{np.percentile(compile_ms, 50):.1f}", f"{np.percentile(compile_ms, 99):.1f}",
                  f"{max(compile_ms):.1f}"]])


if __name__ == "__main__":
    main()
