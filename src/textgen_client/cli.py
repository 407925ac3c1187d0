"""textgen-client: generate from a textgen server on the command line.

    textgen-client "Once upon a time" --max-tokens 40
    textgen-client --chat "What is the capital of France?"
"""
from __future__ import annotations

import argparse
import json
import sys

from textgen_client.client import TextgenClient, TextgenError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textgen-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="Prompt text (with --chat: the user's message).")
    parser.add_argument("--url", default="localhost:8001", help="Server gRPC address.")
    parser.add_argument("--model", default="ensemble", help="Model name on the server.")
    parser.add_argument("--chat", action="store_true",
                        help="Send the prompt as a user message through the chat template.")
    parser.add_argument("--system", help="With --chat: a system message before the prompt.")
    parser.add_argument("--no-stream", action="store_true", help="Print the whole text at the end.")
    parser.add_argument("--show-ids", action="store_true", help="Also print the output token ids.")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", dest="stop_words", help="A stop sequence "
                        "(repeat for several).")
    parser.add_argument("--adapter-id", help="A LoRA adapter to answer with.")
    parser.add_argument("--prefix-id", help="A tuned soft prompt from the server's prefix "
                        "store to start with.")
    parser.add_argument("--adapter-source", help="Where the server looks the adapter up: "
                        "\"hub\" or \"local\" (default: the server's --adapter-source).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompt = args.prompt
    params = {name: getattr(args, name) for name in
              ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
               "stop_words", "adapter_id", "adapter_source", "prefix_id")}
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = json.dumps(messages + [{"role": "user", "content": args.prompt}])
        params["apply_chat_template"] = True
    client = TextgenClient(args.url, args.model)
    ids, finish_reason = [], ""
    try:
        for chunk in client.stream(prompt, stream=not args.no_stream, **params):
            print(chunk.text, end="", flush=True)
            ids += chunk.output_ids
            finish_reason = chunk.finish_reason or finish_reason
    except TextgenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print()
    if args.show_ids:
        print(f"[finish_reason={finish_reason} output_ids={ids}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
