"""Speculative decoding: proposers draft tokens, one step verifies them (see speculator.py)."""
