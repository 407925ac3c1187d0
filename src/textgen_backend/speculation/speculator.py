"""Attaches drafts to a scheduled step. A decoding sequence then contributes its newest token
plus N drafted ones as query rows against its paged KV; the step samples every row with the
request's full logits pipeline as if the drafts before it were accepted, and the scheduler keeps
the drafts that equal the sampled tokens plus the first sampled token after them. Sampling is a
function of (seed, token index, logits), so the output is exactly that of decoding one token a
step: speculation changes how many steps it takes, never what comes out.

Steps of more than --speculation-max-batch-size decoding rows get no drafts. Drafts never pass
max_tokens or what a row's grammar allows (each draft row is then masked by a copy of the
matcher that consumed the drafts before it), and only use KV blocks that are free after every
running sequence has its next slot (the scheduler trims what the rejected ones held)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from textgen_backend.speculation.ngram import propose_ngram

if TYPE_CHECKING:  # the engine's parts are passed in, never imported at run time
    from textgen_backend.engine.block_manager import BlockManager
    from textgen_backend.engine.scheduler import SchedulerOutput, StepOutput


@dataclass
class SpeculationCounters:
    method: str                     # "ngram" or "medusa"
    draft_tokens: int = 0           # since start
    accepted_tokens: int = 0        # drafts equal to the token sampled there, since start
    verify_rows: int = 0            # sequence-steps that carried drafts, since start


class Speculator:
    def __init__(self, num_drafts: int, max_batch_size: int, method: str,
                 block_manager: BlockManager):
        self.num_drafts = num_drafts
        self.max_batch_size = max_batch_size
        self.block_manager = block_manager
        self.counters = SpeculationCounters(method)

    def drafts_for(self, num_decoding: int) -> bool:
        """Whether a step of num_decoding decoding sequences gets drafts."""
        return num_decoding <= self.max_batch_size

    def attach(self, out: SchedulerOutput) -> None:
        """Gives out's decoding rows their drafts (out.draft_ids, num_new_tokens)."""
        rows = [i for i, (s, n) in enumerate(zip(out.seqs, out.num_new_tokens))
                if n == 1 and s.is_decoding]
        if not rows or not self.drafts_for(len(rows)):
            return
        seqs = [out.seqs[i] for i in rows]
        if self.counters.method == "medusa":
            proposals = [s.next_drafts[:self.num_drafts] for s in seqs]
        else:
            proposals = propose_ngram([s.all_ids for s in seqs], self.num_drafts)
        drafts: list[list[int]] = [[] for _ in out.seqs]
        for row, seq, proposal in zip(rows, seqs, proposals):
            room = seq.stopping.max_tokens - len(seq.output_ids) - 1  # the step adds 1 anyway
            proposal = proposal[:max(room, 0)]
            if seq.matcher is not None:  # a draft the grammar forbids could never be accepted
                proposal = proposal[:seq.matcher.validate_tokens(proposal)]
            proposal = proposal[:self.block_manager.reserve(seq, len(proposal))]
            if proposal:
                drafts[row] = proposal
                out.num_new_tokens[row] += len(proposal)
                self.counters.draft_tokens += len(proposal)
                self.counters.verify_rows += 1
        if any(drafts):
            out.draft_ids = drafts

    def record(self, out: SchedulerOutput, outputs: list[StepOutput]) -> None:
        """Counts the drafts of out that its step's outputs (StepOutput) accepted."""
        if out.draft_ids is None:
            return
        drafted = {s.seq_id: d for s, d in zip(out.seqs, out.draft_ids) if d}
        for output in outputs:
            drafts = drafted.get(output.seq_id)
            if drafts:
                self.counters.accepted_tokens += next(
                    (j for j, (token, draft) in enumerate(zip(output.new_token_ids, drafts))
                     if token != draft), min(len(output.new_token_ids), len(drafts)))
