"""What a step that raises does to the engine, and the test-only fault injection.

A step that raises fails exactly its own sequences (an error response naming the cause, their KV
freed); the others and new requests go on. Out of device memory, the newest half of the step's
sequences go back to the queue instead (recomputed later, their output unchanged) and the batch
is capped at what is left; the cap doubles back after OOM_CAP_STEPS good steps. Only a step of one
sequence that does not fit fails on out-of-memory.

TEXTGEN_FAULT_INJECTION (tests only: read once at start, inert when unset) makes chosen engine
steps misbehave, counted from 1 over steps that run the model: "raise@5,oom@9,sleep@12:0.5" makes
step 5 raise a RuntimeError, step 9 a torch.cuda.OutOfMemoryError and step 12 sleep half a
second before its forward. "raise%50" raises at every 50th step.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

FAULT_INJECTION_ENV = "TEXTGEN_FAULT_INJECTION"
OOM_CAP_STEPS = 50  # good steps before an out-of-memory cap on the batch doubles


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class _Fault:
    kind: str           # raise | oom | sleep
    step: int           # at this step, or every `step` steps with periodic
    periodic: bool = False
    seconds: float = 0.0


class FaultInjector:
    def __init__(self, spec: str):
        self.faults = [self._parse(part.strip()) for part in spec.split(",") if part.strip()]
        self.steps = 0

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        spec = os.environ.get(FAULT_INJECTION_ENV, "")
        return cls(spec) if spec else None

    @staticmethod
    def _parse(part: str) -> _Fault:
        periodic = "%" in part
        kind, _, rest = part.partition("%" if periodic else "@")
        step, _, seconds = rest.partition(":")
        if kind not in ("raise", "oom", "sleep") or not step.isdigit() or int(step) < 1:
            raise ValueError(f"{FAULT_INJECTION_ENV}: cannot read {part!r} (e.g. raise@5, "
                             f"oom@9, sleep@12:0.5, raise%50)")
        return _Fault(kind, int(step), periodic, float(seconds or 0))

    def before_forward(self) -> None:
        self.steps += 1
        for fault in self.faults:
            due = (self.steps % fault.step == 0) if fault.periodic else self.steps == fault.step
            if not due:
                continue
            if fault.kind == "sleep":
                time.sleep(fault.seconds)
            elif fault.kind == "oom":
                raise torch.cuda.OutOfMemoryError(f"injected out-of-memory at step {self.steps}")
            else:
                raise RuntimeError(f"injected fault at step {self.steps}")
