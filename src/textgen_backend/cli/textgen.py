"""The `textgen` command. Each subcommand is one `_add_*` function that registers its parser and runner."""

import argparse
import logging
import sys
from pathlib import Path

from textgen_backend.weights.convert_weights import convert_to_safetensors
from textgen_backend.weights.demo_model import ensure_demo_model
from textgen_backend.weights.download import download_weights
from textgen_backend.weights.gguf_convert import convert_gguf
from textgen_backend.cli.tritonserver import run_tritonserver
from textgen_backend.weights.loading import resolve_model_dir


def _add_convert_gguf(subcommands) -> None:
    parser = subcommands.add_parser("convert-gguf", help="convert a llama GGUF file into a float32 HF directory")
    parser.add_argument("file", type=Path, help="GGUF file to convert")
    parser.add_argument("out", type=Path, help="output directory (created if missing)")
    parser.set_defaults(run=lambda args: convert_gguf(args.file, args.out))


def _add_demo_model(subcommands) -> None:
    parser = subcommands.add_parser("demo-model", help="fetch and convert the demo model; print its directory")
    parser.add_argument("--cache-root", type=Path, default=None,
                        help="cache directory (default: $TEXTGEN_CACHE or ~/.cache/textgen)")
    # the path is the only stdout line, so scripts can use $(textgen demo-model)
    parser.set_defaults(run=lambda args: print(ensure_demo_model(args.cache_root)))


def _add_download_weights(subcommands) -> None:
    parser = subcommands.add_parser(
        "download-weights", help="download a hub model into the Hugging Face cache (safetensors, "
                                 "else PyTorch .bin converted); print its directory")
    parser.add_argument("model_id", help="hub model id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--revision", default=None, help="branch, tag or commit")
    parser.add_argument("--extension", default=".safetensors",
                        help="comma-separated extensions of the files to download besides the "
                             "config and tokenizer (default: .safetensors)")
    parser.add_argument("--huggingface-hub-cache", default=None,
                        help="hub cache to download into (default: HF_HUB_CACHE)")
    parser.set_defaults(run=lambda args: print(download_weights(
        args.model_id, args.revision, tuple(e.strip() for e in args.extension.split(",") if e),
        args.huggingface_hub_cache)))


def _add_convert_to_safetensors(subcommands) -> None:
    parser = subcommands.add_parser(
        "convert-to-safetensors", help="convert a model's PyTorch .bin weights to safetensors, "
                                       "beside them")
    parser.add_argument("model_id", help="model directory, or a hub id in the local cache")
    parser.add_argument("--revision", default=None, help="revision of a hub id")
    parser.add_argument("--huggingface-hub-cache", default=None,
                        help="hub cache to resolve the id in (default: HF_HUB_CACHE)")

    def run(args):
        model_dir = resolve_model_dir(args.model_id, args.revision, args.huggingface_hub_cache)
        for path in convert_to_safetensors(model_dir):
            print(path)

    parser.set_defaults(run=run)


def _add_tritonserver(subcommands) -> None:
    parser = subcommands.add_parser(
        "tritonserver", help="run tritonserver on a rendered repository (build.py) with the "
                             "environment our models need; Ctrl-C drains as the launcher does",
        description="Runs tritonserver with the given arguments (e.g. --model-repository DIR) "
                    "from PATH or the nvidia-pytriton wheel: its Python backend, this "
                    "virtualenv for the stubs, the interpreter's libpython, the repository as "
                    "working directory. SIGINT/SIGTERM drain the generator first.")
    parser.add_argument("--drain-timeout-s", type=float, default=30.0,
                        help="seconds in-flight requests get on SIGINT/SIGTERM (default 30)")
    # Every other argument is tritonserver's, in order (main() passes them as args.unknown).
    parser.set_defaults(run=lambda args: sys.exit(run_tritonserver(args.unknown,
                                                                   args.drain_timeout_s)),
                        passes_unknown=True)


def _add_serve_api(subcommands) -> None:
    parser = subcommands.add_parser(
        "serve-api", add_help=False,
        help="the OpenAI and TGI/LoRAX REST APIs in front of a running textgen tritonserver "
             "(--triton-url HOST:GRPC_PORT --port 3000; --help for the rest)")

    def run(args):
        from textgen_api.app import main as serve_api
        serve_api(args.unknown)

    parser.set_defaults(run=run, passes_unknown=True)


_SUBCOMMANDS = (_add_convert_gguf, _add_demo_model, _add_download_weights,
                _add_convert_to_safetensors, _add_tritonserver, _add_serve_api)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="textgen", description=__doc__.splitlines()[0])
    subcommands = parser.add_subparsers(dest="command", required=True)
    for add_subcommand in _SUBCOMMANDS:
        add_subcommand(subcommands)
    args, args.unknown = parser.parse_known_args(argv)
    if args.unknown and not getattr(args, "passes_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(args.unknown)}")
    # logs go to stderr; stdout carries only command results
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
