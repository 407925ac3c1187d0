#!/usr/bin/env python3
"""Render a model repository that plain `tritonserver --model-repository OUTPUT` serves.

    python build.py --model-id /models/my-llama --output /srv/repository [launcher flags]

The flags are textgen-launcher's engine flags (TGI names; env vars of the same name).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # usable before `pip install`

from textgen_backend.config import (EngineConfig, FlagHelpFormatter, add_flags,  # noqa: E402
                                    from_flags)
from textgen_backend.cli.repository import render_repository  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=FlagHelpFormatter,
                                     usage="%(prog)s --output DIR [OPTIONS]")
    parser.add_argument("--output", required=True, help="Directory to render into.")
    add_flags(parser, EngineConfig)
    args = parser.parse_args(argv)
    try:
        config = from_flags(EngineConfig, args)
        render_repository(config, Path(args.output))
    except ValueError as exc:
        parser.error(str(exc))
    print(f"rendered {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
