"""A model spread over devices by accelerate's device_map: one placement per device its layers are on, each with its
share of the byte budgets; stats summed over them; kernels launched with the layer's device current. The CPU cases
check the pieces; the multigpu-marked ones run a tiny Llama over two GPUs against one."""
from __future__ import annotations

import pytest
import torch

from kvtier import ReAttentionCache, ReAttentionConfig
from kvtier.hf import layer_device_shares
from kvtier.tiers.placement import SharedPlacement, _summed
from tests.conftest import greedy, random_ids, tiny_model

SCOPE = dict(global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12)
GiB = 2**30


def test_each_device_gets_its_share_of_every_budget():
    config = ReAttentionConfig(gpu_budget="8GiB", host_budget="4GiB", disk_path="/tmp", disk_budget=GiB).resolve(2048)
    shared = SharedPlacement(config, {torch.device("cuda", 0): 0.25, torch.device("cuda", 1): 0.75})
    first, second = shared.config_on(torch.device("cuda", 0)), shared.config_on(torch.device("cuda", 1))
    assert (first.budget_bytes("gpu_budget"), first.budget_bytes("host_budget")) == (2 * GiB, GiB)
    assert (second.budget_bytes("gpu_budget"), second.budget_bytes("disk_budget")) == (6 * GiB, 3 * GiB // 4)
    assert SharedPlacement(config, {torch.device("cpu"): 1.0}).config_on(torch.device("cpu")) is config
    unlimited = ReAttentionConfig().resolve(2048)
    assert SharedPlacement(unlimited, {torch.device("cuda", 1): 0.5}).config_on(torch.device("cuda", 1)) is unlimited


def test_a_gpu_budget_per_device_is_taken_as_given():
    config = ReAttentionConfig(gpu_budget={"cuda:0": "2GiB", "cuda:1": 3 * GiB}, host_budget="4GiB",
                               disk_path="/tmp").resolve(2048)
    shared = SharedPlacement(config, {torch.device("cuda", 0): 0.25, torch.device("cuda", 1): 0.75})
    first, second = shared.config_on(torch.device("cuda", 0)), shared.config_on(torch.device("cuda", 1))
    assert (first.gpu_budget, second.gpu_budget) == (2 * GiB, 3 * GiB)  # as given, not split
    assert (first.budget_bytes("host_budget"), second.budget_bytes("host_budget")) == (GiB, 3 * GiB)  # split
    with pytest.raises(ValueError, match=r"gpu_budget is given for \['cuda:0', 'cuda:1'\], but this model has layers "
                                         r"on cuda:2: add its budget"):
        shared.config_on(torch.device("cuda", 2))


@pytest.mark.parametrize("budget, message", [
    ({"gpu0": "1GiB"}, r"gpu_budget names 'gpu0', which is no device with an index: write the devices as 'cuda:0'"),
    ({"cuda": "1GiB"}, r"gpu_budget names 'cuda', which is no device with an index"),
    ({"cuda:0": "lots"}, r"gpu_budget\['cuda:0'\]='lots' is not a size"),
])
def test_a_bad_gpu_budget_per_device_names_the_entry(budget, message):
    with pytest.raises(ValueError, match=message):
        ReAttentionConfig(gpu_budget=budget).resolve(2048)


def test_a_model_on_one_device_has_one_share():
    assert layer_device_shares(tiny_model("llama")) == {torch.device("cpu"): 1.0}


def test_stats_of_several_devices_are_summed():
    model = tiny_model("llama")
    cache = ReAttentionCache(model, SCOPE)
    greedy(model, random_ids(120), cache, new_tokens=4)
    one = cache.placement.stats()
    both = _summed([one, one])
    assert both["span_bytes"] == one["span_bytes"] and both["spans"]["gpu"] == 2 * one["spans"]["gpu"]
    assert both["tiers"]["gpu"] == {key: 2 * value for key, value in one["tiers"]["gpu"].items()}
    assert cache.placements == [cache.placement] and cache.stats()["spans"] == one["spans"]


# ---- two GPUs ---------------------------------------------------------------------------------------------------
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def _split(model):
    """The tiny model with its first layer on cuda:0 and the rest on cuda:1, as device_map places it."""
    from accelerate import dispatch_model

    layers = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
                  **{f"model.layers.{i}": 0 if i < layers // 2 else 1 for i in range(layers)}}
    return dispatch_model(model, device_map=device_map)


@needs_two_gpus
@pytest.mark.multigpu
@pytest.mark.parametrize("policy", ["consensus", "quest"])
def test_layers_on_two_gpus_give_one_gpus_tokens(policy):
    ids = random_ids(300)
    alone = tiny_model("llama").cuda()
    expected = greedy(alone, ids.cuda(), ReAttentionCache(alone, SCOPE, policy=policy, decode_graphs="off"))
    split = _split(tiny_model("llama"))
    cache = ReAttentionCache(split, SCOPE, policy=policy, gpu_budget=2**20)
    assert torch.equal(greedy(split, ids.cuda(0), cache).cpu(), expected.cpu())
    assert {placement.device for placement in cache.placements} == {torch.device("cuda", 0), torch.device("cuda", 1)}
    assert cache.stats()["spans"]["gpu"] == sum(p.stats()["spans"]["gpu"] for p in cache.placements)


@needs_two_gpus
@pytest.mark.multigpu
def test_a_split_cache_refuses_to_save_and_a_saved_one_loads_split(tmp_path):
    ids = random_ids(300)
    alone = tiny_model("llama").cuda()
    saved = ReAttentionCache(alone, SCOPE)
    greedy(alone, ids.cuda(), saved, new_tokens=1)
    saved.save(tmp_path / "one.lmdb")
    follow = random_ids(6, seed=5).cuda()
    expected = greedy(alone, torch.cat([saved.token_ids.cuda(), follow], -1), saved)
    split = _split(tiny_model("llama"))
    loaded = ReAttentionCache.load(tmp_path / "one.lmdb", split)
    assert len(loaded.placements) == 2
    assert torch.equal(greedy(split, torch.cat([loaded.token_ids.cuda(0), follow.cuda(0)], -1), loaded).cpu(),
                       expected.cpu())
    with pytest.raises(ValueError, match="several devices"):
        loaded.save(tmp_path / "split.lmdb")
    assert not (tmp_path / "split.lmdb").exists()
