"""The `textgen` command. Each subcommand is one `_add_*` function that registers its parser and runner."""

import argparse
import logging
import sys
from pathlib import Path

from .demo_model import ensure_demo_model
from .gguf_convert import convert_gguf


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


_SUBCOMMANDS = (_add_convert_gguf, _add_demo_model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="textgen", description=__doc__.splitlines()[0])
    subcommands = parser.add_subparsers(dest="command", required=True)
    for add_subcommand in _SUBCOMMANDS:
        add_subcommand(subcommands)
    args = parser.parse_args(argv)
    # logs go to stderr; stdout carries only command results
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
