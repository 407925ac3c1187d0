"""textgen's REST front end: OpenAI's and TGI/LoRAX's HTTP APIs over the Triton ensemble (gRPC).
It holds no engine code: every request becomes one ensemble request (textgen_client.aio)."""
