"""The engine step: schedule -> run the model -> update, over the paged KV cache (sequence
state, block manager, scheduler, model runner with CUDA graphs). Knows nothing of Triton."""
