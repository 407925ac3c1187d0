"""What each quantization costs in accuracy (issue 18): the demo model (SmolLM2-135M-Instruct;
`--demo DIR`, default `textgen demo-model`) over a fixed text of at least 2,000 tokens (the
CPython LICENSE.txt the interpreter ships), teacher-forced in one pass. Against the float32
model: the mean KL divergence of the next-token distributions, and each variant's perplexity.

Variants: bfloat16 weights and activations; int4 round-to-nearest with groups of 64 (what a
GPTQ/AWQ kernel reads, here without GPTQ's or AWQ's calibration: an upper bound on their error;
symmetric as GPTQ checkpoints usually are, asymmetric (zero points) as AWQ's; 64 as the demo
model's hidden size, 576, is no multiple of 128); each --quantize scheme that quantizes on the
fly, with quantization/formats.py's numbers (the same code the server runs), in float32
activations; and --kv-cache-dtype fp8: the float32 model whose keys (after rotary) and values
are rounded as the fp8 e4m3 cache stores them (kv_store.to_cache_dtype, no scales) before
attention reads them. Runs on the CPU in a few minutes.

    python bench/bench_quant_accuracy.py [--demo DIR] [--tokens 2048]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from common import print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from on_the_fly_reference import quantize_reference  # noqa: E402
from quant_checkpoints import dequantize, quantize_rtn  # noqa: E402
from textgen_backend.quantization.schemes import ON_THE_FLY  # noqa: E402
from textgen_kernels.kv_store import FP8, to_cache_dtype  # noqa: E402


def fixed_text() -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()


def int4_rtn(model, sym: bool, group_size: int = 64):
    """4-bit round-to-nearest per group of inputs as the GPTQ / AWQ formats store it (the
    tests' packer, tests/quant_checkpoints.py), dequantized in place."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head":
            module.weight.data = dequantize(quantize_rtn(module.weight.data, 4, group_size,
                                                         sym=sym, perm=None))
    return model


class Fp8KvCache(torch.nn.Module):
    """The model with its keys (after rotary) and values rounded through the fp8 cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        for name, module in model.named_modules():
            if name.endswith("v_proj"):
                module.register_forward_hook(lambda _m, _i, out: _through_fp8(out))

    def forward(self, ids):
        from transformers.models.llama import modeling_llama

        rotate = modeling_llama.apply_rotary_pos_emb

        def rotate_and_round(q, k, *args, **kwargs):
            q, k = rotate(q, k, *args, **kwargs)
            return q, _through_fp8(k)
        modeling_llama.apply_rotary_pos_emb = rotate_and_round
        try:
            return self.model(ids)
        finally:
            modeling_llama.apply_rotary_pos_emb = rotate


def _through_fp8(x: torch.Tensor) -> torch.Tensor:
    return to_cache_dtype(x, FP8).to(x.dtype)


def log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(ids[None]).logits[0].float(), dim=-1)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", help="the demo model's directory")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    demo = args.demo or subprocess.run([sys.executable, "-m", "textgen_backend.cli.textgen",
                                        "demo-model"], capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1]
    ids = torch.tensor(AutoTokenizer.from_pretrained(demo)(fixed_text())["input_ids"][
        :args.tokens])
    if len(ids) < 2000:
        raise SystemExit(f"the fixed text has {len(ids)} tokens, fewer than 2,000")

    def load(dtype=torch.float32):
        return AutoModelForCausalLM.from_pretrained(demo, dtype=dtype).eval()

    reference = log_probs(load(), ids)
    targets = ids[1:]
    variants = {"float32": load, "bfloat16": lambda: load(torch.bfloat16),
                "int4 RTN g64 symmetric (gptq)": lambda: int4_rtn(load(), sym=True),
                "int4 RTN g64 zero points (awq)": lambda: int4_rtn(load(), sym=False)}
    for scheme in ON_THE_FLY:
        variants[scheme] = lambda scheme=scheme: quantize_reference(load(), scheme)
    variants["--kv-cache-dtype fp8 (float32 weights)"] = lambda: Fp8KvCache(load())
    rows = []
    for name, build in variants.items():
        lp = reference if name == "float32" else log_probs(build(), ids)
        kl = (reference.exp() * (reference - lp)).sum(-1)[:-1].mean().item()
        nll = -lp[:-1].gather(1, targets[:, None]).mean().item()
        rows.append([name, f"{kl:.4f}", f"{torch.tensor(nll).exp().item():.2f}"])
    print(f"{len(ids)} tokens of CPython's LICENSE.txt; model {demo}")
    print_table("Accuracy against float32 (teacher-forced)",
                ["variant", "mean KL(fp32 || variant)", "perplexity"], rows)


if __name__ == "__main__":
    main()
