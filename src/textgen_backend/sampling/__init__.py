"""Choosing tokens: per-request generation parameters, the batched logits processors and the
step's sampling with its logprob details."""
