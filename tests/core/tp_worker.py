"""Run by tests/core/test_tensor_parallel.py under `torchrun --nproc_per_node 2`: loads the saved tiny model with
transformers' tp_plan="auto" (gloo on the CPU), generates greedily with a ReAttentionCache for each configuration, and
on rank 0 writes {configuration: {"tokens", "ranks_agree", "kv_heads"}} to the JSON path given."""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from kvtier import ReAttentionCache

CONFIGURATIONS = {  # name -> ReAttentionCache overrides, beside the test's SCOPE
    "consensus": {},
    "consensus per_kv_head": {"per_kv_head": True},
    "quest": {"policy": "quest"},
    "quest per_kv_head": {"policy": "quest", "per_kv_head": True},
}


def prompt(vocab_size: int) -> torch.Tensor:
    """The prompt [1, 150] every configuration generates from: one on which a selection shared by both KV heads
    differs from one per head (test_the_shared_selection_differs_from_each_ranks_own)."""
    return (torch.arange(150)[None] * 5) % vocab_size


def main(model_dir: str, out: str, scope: str, new_tokens: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32)
    ids = prompt(model.config.vocab_size)
    results = {}
    for name, overrides in CONFIGURATIONS.items():
        cache = ReAttentionCache(model, json.loads(scope), **overrides)
        with torch.inference_mode():
            tokens = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False)[:, ids.shape[1]:]
        every = [torch.empty_like(tokens) for _ in range(dist.get_world_size())]
        dist.all_gather(every, tokens)
        results[name] = {"tokens": tokens.tolist(), "ranks_agree": all(torch.equal(t, tokens) for t in every),
                         "kv_heads": cache.layers[0].kv_heads}
    if dist.get_rank() == 0:
        with open(out, "w") as file:
            json.dump(results, file)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
