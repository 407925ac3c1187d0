"""A tensor-parallel worker (ranks 1..N-1), started by rank 0's `ShardGroup`: builds its shard
of the model runner, then runs every call rank 0 sends until "stop". It exits when rank 0's
process goes, and on any error (the ranks would be out of step; rank 0 sees the exit)."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from textgen_backend.config import EngineConfig
from textgen_backend.logs import configure_logging
from textgen_backend.parallel.channel import Mailbox
from textgen_backend.parallel.group import init_rank

logger = logging.getLogger("textgen")


def _exit_with_parent() -> None:
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def serve(runner, mailbox: Mailbox, reader: int, calls) -> None:
    while True:
        name, args = mailbox.receive(reader, calls)
        if name == "stop":
            return
        getattr(runner, name)(*args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for option in ("--rank", "--world-size", "--master-port"):
        parser.add_argument(option, type=int, required=True)
    for option in ("--master-addr", "--device", "--model-dir", "--build-runner", "--mailbox",
                   "--config"):
        parser.add_argument(option, required=True)
    args = parser.parse_args(argv)
    # Stopping is rank 0's call (the engine process ignores these signals too).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = EngineConfig.from_json(args.config)
    configure_logging(config.json_output)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    device = torch.device(args.device)
    tp, calls = init_rank(args.rank, args.world_size, args.master_addr, args.master_port, device)
    module, _, function = args.build_runner.partition(":")
    try:
        build_runner = getattr(importlib.import_module(module), function)
        runner = build_runner(config, Path(args.model_dir), device, tp)
        mailbox = Mailbox.attach(args.mailbox, args.world_size - 1)
        serve(runner, mailbox, args.rank - 1, calls)
        mailbox.close(unlink=False)
    except Exception:
        logger.exception("[textgen] tensor-parallel worker %d failed", args.rank)
        os._exit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
