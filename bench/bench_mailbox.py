"""Send-to-receive latency of one tensor-parallel call (a decode step's ForwardStep-sized
message: 64 sequences' ids and 20-block tables) from rank 0 to a worker process: gloo's
broadcast_object_list against the shared-memory mailbox (parallel/channel.py). Runs anywhere
(CPU only); CLOCK_MONOTONIC is shared by the two processes.

    python bench/bench_mailbox.py [--calls 200] [--gap-ms 2]
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import numpy as np
import torch.distributed as dist

from common import print_table
from textgen_backend.parallel.channel import Mailbox

STEP = {"ids": list(range(64)), "tables": np.arange(64 * 20).reshape(64, 20)}


def worker(address: str, name: str, calls: int) -> None:
    dist.init_process_group("gloo", init_method=address, rank=1, world_size=2)
    box = Mailbox.attach(name, readers=1)
    for channel in ("gloo", "mailbox"):
        latencies = []
        for _ in range(calls):
            if channel == "gloo":
                message = [None]
                dist.broadcast_object_list(message, src=0)
                sent = message[0][0]
            else:
                sent = box.receive(0, None)[0]
            latencies.append(time.perf_counter() - sent)
        dist.broadcast_object_list([latencies], src=1)
    box.close(unlink=False)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--gap-ms", type=float, default=2.0, help="a step's GPU time")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args.calls)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    box = Mailbox.create(readers=1)
    child = subprocess.Popen([sys.executable, __file__, "--calls", str(args.calls),
                              "--worker", address, box.name])
    dist.init_process_group("gloo", init_method=address, rank=0, world_size=2)
    rows = []
    for channel in ("gloo", "mailbox"):
        for _ in range(args.calls):
            time.sleep(args.gap_ms / 1e3)
            message = (time.perf_counter(), STEP)
            if channel == "gloo":
                dist.broadcast_object_list([message], src=0)
            else:
                box.send(message, None)
        result = [None]
        dist.broadcast_object_list(result, src=1)
        latencies = 1e6 * np.asarray(result[0])
        rows.append([channel, f"{np.median(latencies):.0f}", f"{np.percentile(latencies, 90):.0f}"])
    child.wait()
    box.close(unlink=True)
    dist.destroy_process_group()
    print_table(f"one call rank 0 -> worker, {args.calls} calls {args.gap_ms} ms apart",
                ["channel", "median µs", "p90 µs"], rows)


if __name__ == "__main__":
    main()
