"""Tensor parallelism (kvtier.parallel): a tiny Llama split over 2 ranks by transformers' tp_plan="auto" (gloo on the
CPU, under torchrun) holds half the KV heads per rank and generates exactly the tokens of one process, with a
selection shared by all heads (the ranks gather each other's span scores) and per KV head (no communication)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from kvtier import ReAttentionCache
from tests.conftest import tiny_model
from tests.core.tp_worker import CONFIGURATIONS, prompt

SCOPE = dict(global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12)
NEW = 16
WORKER = Path(__file__).with_name("tp_worker.py")
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


def _tensor_parallel_against_one(folder: Path, device: str) -> tuple[dict, dict]:
    """Save the tiny model to `folder`, generate with it on 2 ranks (gloo on the CPU, or NCCL over 2 GPUs with
    device "cuda") and in one process on `device` -> (one process's tokens, the ranks' results) per configuration."""
    tiny_model("llama").save_pretrained(folder / "model")
    out = folder / "results.json"
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=path)
    if device == "cpu":  # the ranks run on the CPU also where GPUs are visible, as the one process they are held to
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(folder / "model"), str(out), json.dumps(SCOPE), str(NEW)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).to(device)
    ids = prompt(single.config.vocab_size).to(device)
    alone = {}
    for name, overrides in CONFIGURATIONS.items():
        cache = ReAttentionCache(single, SCOPE, decode_graphs="off", **overrides)
        with torch.inference_mode():
            alone[name] = single.generate(ids, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW,
                                          do_sample=False)[:, 150:].tolist()
    return alone, json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _tensor_parallel_against_one(tmp_path_factory.mktemp("tp"), "cpu")


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_two_ranks_generate_the_tokens_of_one_process(runs, name):
    alone, parallel = runs
    assert parallel[name]["ranks_agree"]
    assert parallel[name]["kv_heads"] == 1  # the tiny model's 2 KV heads, one per rank
    assert parallel[name]["tokens"] == alone[name]


def test_the_shared_selection_differs_from_each_ranks_own():
    """The case the gathering is for: on this prompt a selection shared by both KV heads differs from one per head,
    so ranks selecting from their own heads alone would not reproduce one process."""
    model = tiny_model("llama")
    ids = prompt(model.config.vocab_size)
    tokens = []
    for per_kv_head in (False, True):
        with torch.inference_mode():
            tokens.append(model.generate(ids, past_key_values=ReAttentionCache(model, SCOPE, per_kv_head=per_kv_head),
                                         max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False))
    assert not torch.equal(*tokens)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL)")
@pytest.mark.multigpu
def test_two_gpus_generate_the_tokens_of_one(tmp_path):
    alone, parallel = _tensor_parallel_against_one(tmp_path, "cuda")
    for name in CONFIGURATIONS:
        assert parallel[name]["ranks_agree"] and parallel[name]["tokens"] == alone[name], name
