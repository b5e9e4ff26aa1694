"""Scratch (RESULTS 28d): keep_first_span with span 0 ranked best instead of last where it is brought in (so best-last
lays it out next to the local window, as the oracle lays out forced spans); with --muted, span 0's votes taken away
as in span0_muted.py. Run as `kvtier niah`."""
import sys

import torch

import kvtier.policies.consensus as consensus
from kvtier.policies.base import best_run_last, rank_spans
from kvtier.tools.cli import main


def best_spans_span_0_best(primary, secondary, k, merge_heads=None, layout="text", keep_first=False):
    ranked = rank_spans(primary, secondary)[..., :k]  # [..., k] best first
    if keep_first and ranked.shape[-1] > 0:
        chosen = (ranked == 0).any(-1, keepdim=True)
        others = ranked[..., :-1]
        ranked = torch.where(chosen, ranked, torch.cat((torch.zeros_like(ranked[..., :1]), others), dim=-1))
    return best_run_last(ranked) if layout == "best_last" else ranked.sort(dim=-1).values


def layer_vote_without_span_0(self, mass, beyond=None):
    vote = original(self, mass, beyond)
    return vote.index_fill(-1, torch.zeros(1, dtype=torch.long, device=vote.device), 0.0)


consensus.best_spans = best_spans_span_0_best
original = consensus.ConsensusPolicy.layer_vote
if "--muted" in sys.argv:
    sys.argv.remove("--muted")
    consensus.ConsensusPolicy.layer_vote = layer_vote_without_span_0
raise SystemExit(main(sys.argv[1:]))
