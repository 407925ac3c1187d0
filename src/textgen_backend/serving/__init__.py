"""What the Triton models call: the generation service and its threads, request parsing, the
tensor contract, tokenizing, incremental detokenizing, stop sequences, responses, metrics."""
