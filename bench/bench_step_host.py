"""Host time of one engine step, on the CPU with a one-layer toy model (the forward is a few
small matmuls, so what shows is the engine's own Python: scheduling, step tensors, sampling).
Compares two source trees, e.g. a commit's worktree against the working tree:

    git worktree add /tmp/old <commit>
    python bench/bench_step_host.py /tmp/old .      (each tree's src/ and tests/ are imported)
    python bench/bench_step_host.py . .:no-async    (a tree with --no-async-scheduling)

Each tree runs in its own process, twice, alternating; medians of 150 decode steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import print_table

MODEL = Path("/tmp/bench-step-host-model")


def measure(root: Path, no_async: bool) -> dict[int, float]:
    sys.path[:0] = [str(root / "src"), str(root / "tests")]
    import torch

    from textgen_backend.config import EngineConfig
    from textgen_backend.engine.engine import Engine
    from textgen_backend.engine.sequence import Sequence
    from textgen_backend.sampling.params import SamplingParams, StoppingParams
    from tiny_models import build_tiny_model

    torch.set_num_threads(1)
    if not (MODEL / "config.json").exists():
        build_tiny_model(MODEL, "llama", hidden_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1)
    engine = Engine(EngineConfig(model_id=str(MODEL), max_lora_rank=0, max_total_tokens=256,
                                 max_batch_total_tokens=20000,
                                 **({"async_scheduling": False} if no_async else {})), MODEL)
    result = {}
    for batch in (1, 32):
        seqs = [Sequence(batch * 100 + i, [5, 6, 7, 8] * 4, SamplingParams(),
                         StoppingParams(max_tokens=200, ignore_eos=True)) for i in range(batch)]
        for s in seqs:
            engine.add(s)
        for _ in range(5):
            engine.step()
        times = []
        for _ in range(150):
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
        result[batch] = 1e3 * statistics.median(times)
        for s in seqs:
            engine.abort(s.seq_id, "done")
        while engine.has_work():
            engine.step()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", help="source trees; TREE:no-async runs that tree "
                                                 "with --no-async-scheduling")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        tree, _, mode = args.measure.partition(":")
        print(json.dumps(measure(Path(tree).resolve(), mode == "no-async")))
        return
    rows = []
    for _ in range(2):
        for tree in args.trees:
            out = subprocess.run([sys.executable, __file__, "--measure", str(tree)],
                                 capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            rows.append([str(tree), f"{result['1']:.3f}", f"{result['32']:.3f}"])
    print_table("host ms per decode step (CPU, one-layer toy model)",
                ["tree", "batch 1", "batch 32"], rows)


if __name__ == "__main__":
    main()
