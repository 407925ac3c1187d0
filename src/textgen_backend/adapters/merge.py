"""LoRAX's per-request adapter merges: several LoRAs combined into one, A matrices and B
matrices merged separately (so `linear` gives sum(w_i B_i) @ sum(w_i A_i), and the adapters
must share their rank).

Strategies, per tensor of one projection, over the adapters that have it:
  linear       sum of w_i * t_i
  ties         each t_i pruned to its `density` largest magnitudes; a sign elected per element
               (`majority_sign_method`: "total" = sign of the sum, "frequency" = the sign most
               t_i have); the weighted values that agree with it averaged
  dare_linear  each t_i kept element-wise with probability `density` and rescaled by 1/density;
               then linear
  dare_ties    the same random pruning; then the sign election and average of ties
The random pruning draws from a generator seeded with `seed`, so a merge is reproducible.
This is not PEFT's add_weighted_adapter(combination_type="linear"), which scales A and B by
sqrt(w_i) each so that a single adapter's delta scales by w_i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from textgen_backend.adapters.peft_format import AdapterError, AdapterWeights, LoraPiece

MERGE_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class MergeParams:
    strategy: str
    weights: tuple[float, ...]
    density: float = 1.0
    majority_sign_method: str = "total"
    seed: int = 0


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    keep = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[t.abs().reshape(-1).topk(keep).indices] = 1
    return t * mask.view_as(t)


def _prune_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def _elected_signs(stack: torch.Tensor, method: str) -> torch.Tensor:
    """[n, ...] -> bool mask of the elements whose sign is the elected one."""
    signs = stack.sign()
    votes = stack.sum(0) if method == "total" else signs.sum(0)
    return signs == torch.where(votes >= 0, 1.0, -1.0)


def _disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge_tensors(tensors: list[torch.Tensor], weights: list[float], params: MergeParams,
                  generator: torch.Generator) -> torch.Tensor:
    """One tensor merged from the adapters' (float32, same shape)."""
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * tensors[0].dim()))
    strategy = params.strategy
    if strategy == "ties":
        tensors = [_prune_magnitude(t, params.density) for t in tensors]
    elif strategy.startswith("dare"):
        tensors = [_prune_random(t, params.density, generator) for t in tensors]
    stack = torch.stack(tensors)
    if strategy in ("linear", "dare_linear"):
        return (stack * w).sum(0)
    return _disjoint_mean(stack * w, _elected_signs(stack, params.majority_sign_method))


def merge_adapters(adapters: list[AdapterWeights], params: MergeParams,
                   name: str) -> AdapterWeights:
    """The merged adapter; each projection merges the adapters that have it, with their weights,
    and is scaled as the first of them (LoRAX keeps the first adapter's config)."""
    ranks = {a.name: a.config.rank for a in adapters}
    if len(set(ranks.values())) > 1:
        raise AdapterError(f"adapter_parameters: merging needs adapters of one rank, got "
                           f"{ranks}")
    generator = torch.Generator().manual_seed(params.seed)
    keys = sorted({key for a in adapters for key in a.pieces})
    pieces = {}
    for key in keys:
        having = [(a.pieces[key], w) for a, w in zip(adapters, params.weights) if key in a.pieces]
        first = having[0][0]
        if any(p.rank != first.rank for p, _ in having):
            raise AdapterError(f"adapter_parameters: layer {key[0]} {key[1]} has different "
                               "ranks across the adapters (rank_pattern): cannot merge")
        weights = [w for _, w in having]
        a = merge_tensors([p.a.float() for p, _ in having], weights, params, generator)
        b = merge_tensors([p.b.float() for p, _ in having], weights, params, generator)
        pieces[key] = LoraPiece(first.target, a, b, first.scaling)
    return AdapterWeights(name, adapters[0].config, pieces)
