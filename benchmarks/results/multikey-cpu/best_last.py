"""Scratch: consensus with its chosen spans laid out by score, the best one last (next to the local window)."""
import sys
import torch
import kvtier.policies.consensus as consensus
from kvtier.policies.base import rank_spans
from kvtier.tools.cli import main


def best_last(primary, secondary, k, merge_heads=None):
    ranked = rank_spans(primary, secondary)[..., :k]  # best first
    return ranked.flip(-1)


consensus.best_spans = best_last
raise SystemExit(main(sys.argv[1:]))
