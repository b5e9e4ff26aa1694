"""Scratch (RESULTS 28d): consensus with span 0's votes taken away, so span 0 never wins on them and keep_first_span
always brings it in the last pick's place, laid out right after the global tokens: how a depth-0 needle reads there
(at 1M it loses its votes among 32K spans; at 16K it wins them, so this forces the 1M case). Run as `kvtier niah`."""
import sys

import torch

from kvtier.policies.consensus import ConsensusPolicy
from kvtier.tools.cli import main


def layer_vote_without_span_0(self, mass, beyond=None):
    vote = original(self, mass, beyond)
    return vote.index_fill(-1, torch.zeros(1, dtype=torch.long, device=vote.device), 0.0)


original = ConsensusPolicy.layer_vote
ConsensusPolicy.layer_vote = layer_vote_without_span_0
raise SystemExit(main(sys.argv[1:]))
