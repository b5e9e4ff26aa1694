"""The static decode step (kvtier.fast_decode) and its CUDA graphs (kvtier.graphs): a decode step that only adds its own
token to the scope gives the eager step's tokens and leaves the cache as the eager step does; every other step (a seal,
a re-selection, a policy that selects every step, beams, a padded batch, a crop) runs eagerly. On the CPU the static
path runs without capture; the gpu-marked cases capture and replay it."""
from __future__ import annotations

import pytest
import torch

from kvtier import ReAttentionCache, ReAttentionConfig
from kvtier.regions import spans_to_seal
from tests.conftest import random_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# scope 8 + 3 x 8 + 32 (+ 3 x 8 while the local window grows to a group of 4 spans) = 88 tokens; a decode step seals
# 4 spans every 32 steps, where consensus re-scores
SCOPE = dict(global_size=8, span_size=8, top_k=3, local_size=32, chunk_size=16, policy="consensus")
NEW = 60


def generate(model, ids, cache, **kwargs):
    with torch.inference_mode():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits)  # the model's logits, not min_new_tokens' -inf


def caches(model, static: bool | None, **config):
    """A cache of SCOPE (+ config): eager, or with the static path (without capture on the CPU)."""
    cache = ReAttentionCache(model, SCOPE | config)
    if static:
        cache.decode_statically(capture=False)
    return cache


def test_static_steps_give_the_eager_tokens_and_cache_state(family):
    model, ids = tiny_model(family), random_ids(150, batch=2)
    eager, static = caches(model, False), caches(model, True)
    eager_tokens, eager_scores = generate(model, ids, eager)
    static_tokens, static_scores = generate(model, ids, static)
    assert torch.equal(static_tokens, eager_tokens)
    torch.testing.assert_close(static_scores, eager_scores, rtol=0, atol=1e-5)
    steps = static._graphs.steps
    # seals (every 32 steps, with consensus' re-scoring) and the first decode step run eagerly, the others statically
    assert NEW // 2 < steps["static"] < NEW - 1 and steps["replayed"] == steps["captures"] == 0
    for ours, theirs in zip(static.layers, eager.layers):
        assert ours.seen == theirs.seen and ours.largest_scope == theirs.largest_scope
        # the K/V of layers after the first differ by the attention's rounding (a masked buffer of the bound)
        for mine, reference in zip(ours.local.view(), theirs.local.view()):
            torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)
        mine, reference = static.policy.layer_state(ours.index), eager.policy.layer_state(theirs.index)
        assert mine.keys() == reference.keys() == {"window", "steps", "selected", "spans"}
        assert all(torch.equal(mine[name], reference[name]) for name in ("steps", "selected", "spans"))
        torch.testing.assert_close(mine["window"], reference["window"], rtol=0, atol=1e-5)
    assert torch.equal(static.token_ids, eager.token_ids)


@pytest.mark.parametrize("seal_group, refresh", [(1, None), (4, None), (4, 8)])
def test_a_decode_steps_eagerly_only_where_it_seals_or_refreshes(seal_group, refresh):
    """Between two seals (seal_group spans at once) and re-scorings (`refresh`), every decode step is static but where
    the local window's buffer is full (it moves its tokens back to its start: rare, once per buffer's length)."""
    model, ids = tiny_model("llama"), random_ids(150)
    static = caches(model, True, seal_group=seal_group, policy_options={"refresh": refresh})
    eager_tokens = generate(model, ids, caches(model, False, seal_group=seal_group,
                                               policy_options={"refresh": refresh}))[0]
    layer, buffer_full, ready = static.layers[0], [], static.fast_decode_ready

    def recording():
        buffer_full.append(layer.local.start + layer.local.length == layer.local.keys.shape[2])
        return ready()

    static.fast_decode_ready = recording
    assert torch.equal(generate(model, ids, static)[0], eager_tokens)
    held = range(ids.shape[1] + 1, ids.shape[1] + NEW)  # tokens held after each decode step (the last is not fed)
    sealed = [spans_to_seal(0, tokens - 8, 32, 8, seal_group) for tokens in held]
    seals = [step for step in range(1, len(held)) if sealed[step] != sealed[step - 1]]
    assert all(sealed[step] % seal_group == 0 for step in seals)
    assert len(seals) == {1: 8, 4: 2}[seal_group]  # 59 steps: a span every 8, or four every 32
    eager, since = 1, 0  # the first decode step is eager; then every seal, and every refresh-th step after a scoring
    for step in range(1, len(held)):
        since += 1
        if step in seals or (refresh is not None and since > refresh):  # consensus re-scores
            eager, since = eager + 1, 0
        elif buffer_full[-len(held):][step]:  # eager, reusing the selection
            eager += 1
    assert static._graphs.steps["static"] == len(held) - eager


def test_a_saved_cache_continues_alike_after_static_steps(tmp_path):
    model, ids = tiny_model("llama"), random_ids(150)
    eager, static = caches(model, False), caches(model, True)
    generate(model, ids, eager)
    generate(model, ids, static)
    eager.save(tmp_path / "eager.kv")
    static.save(tmp_path / "static.kv")
    follow = random_ids(5, seed=7)
    continued = [generate(model, torch.cat([ReAttentionCache.load(tmp_path / name, model).token_ids, follow], -1),
                          ReAttentionCache.load(tmp_path / name, model))[0] for name in ("eager.kv", "static.kv")]
    assert torch.equal(*continued)


@pytest.mark.parametrize("policy", ["quest", "reattention", "streaming"])
def test_policies_that_select_every_step_decode_eagerly(policy):
    model, ids = tiny_model("llama"), random_ids(150)
    static = caches(model, True, policy=policy)
    tokens, _ = generate(model, ids, static)
    assert static._graphs.steps["static"] == 0
    assert torch.equal(tokens, generate(model, ids, caches(model, False, policy=policy))[0])
    assert all(layer.fast is None or not layer.fast.current or not layer.fast_step_ready() for layer in static.layers)


def test_beams_decode_eagerly_with_the_eager_beams():
    model, ids = tiny_model("llama"), random_ids(150)
    static = caches(model, True)
    beams = dict(num_beams=2, num_return_sequences=2)
    tokens, _ = generate(model, ids, static, **beams)
    assert torch.equal(tokens, generate(model, ids, caches(model, False), **beams)[0])
    assert static._graphs.steps["static"] == 0  # rows are reordered every step


def test_a_padded_batch_decodes_eagerly_with_the_eager_tokens():
    model = tiny_model("llama")
    ids = random_ids(150, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    static = caches(model, True)
    tokens, _ = generate(model, ids, static, attention_mask=mask)
    assert torch.equal(tokens, generate(model, ids, caches(model, False), attention_mask=mask)[0])
    assert static._graphs.steps["static"] == 0


def test_a_crop_makes_the_next_step_eager_and_continues_alike():
    """Assisted generation's rollback: the kept scope still holds the removed tokens, so it is not reused."""
    model, ids = tiny_model("llama"), random_ids(150)
    runs = []
    for static in (False, True):
        cache = caches(model, static)
        tokens, _ = generate(model, ids, cache)
        cache.crop(-3)
        assert static is False or not any(layer.fast_step_ready() for layer in cache.layers)
        runs.append(generate(model, torch.cat([ids, tokens[:, :-3]], -1), cache)[0])
    assert torch.equal(*runs)


def test_a_reset_cache_decodes_statically_again():
    model, ids = tiny_model("llama"), random_ids(150)
    cache = caches(model, True)
    first, _ = generate(model, ids, cache)
    static_first = cache._graphs.steps["static"]
    cache.reset()
    assert torch.equal(generate(model, ids, cache)[0], first)
    assert cache._graphs.steps["static"] == static_first > 0


def test_decode_graphs_is_validated_and_auto_keeps_the_cpu_path():
    with pytest.raises(ValueError, match=r"decode_graphs must be one of \('auto', 'off'\), got 'on'"):
        ReAttentionConfig(decode_graphs="on").resolve(2048)
    assert ReAttentionConfig().decode_graphs == "auto"
    model = tiny_model("llama")
    cache = ReAttentionCache(model, SCOPE)
    generate(model, random_ids(100), cache)
    assert cache._graphs is None and all(layer.fast is None for layer in cache.layers)


# ---- captured and replayed on a GPU ----------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_replayed_graphs_give_the_eager_tokens(batch):
    model, ids = tiny_model("llama").cuda(), random_ids(300, batch=batch).cuda()
    graphs = ReAttentionCache(model, SCOPE)  # decode_graphs="auto": captured on CUDA
    tokens, scores = generate(model, ids, graphs)
    eager_tokens, eager_scores = generate(model, ids, ReAttentionCache(model, SCOPE, decode_graphs="off"))
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(scores, eager_scores, rtol=0, atol=1e-4)
    steps = graphs._graphs.steps
    assert steps["captures"] == 1 and steps["replayed"] == steps["static"] - 1 > NEW // 2


@needs_cuda
@pytest.mark.gpu
def test_replayed_graphs_in_bf16_follow_the_eager_logits():
    """A random model's near-ties flip under bf16 rounding, so this compares each step's logits fed the same tokens."""
    model = tiny_model("llama").cuda().to(torch.bfloat16)
    ids = random_ids(300).cuda()
    eager_tokens, eager_scores = generate(model, ids, ReAttentionCache(model, SCOPE, decode_graphs="off"))
    graphs = ReAttentionCache(model, SCOPE)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=graphs)
        for step in range(NEW - 1):
            logits = model(input_ids=eager_tokens[:, step:step + 1], past_key_values=graphs).logits[:, -1]
            torch.testing.assert_close(logits.float(), eager_scores[step + 1].float(), rtol=0, atol=3e-2)
    assert graphs._graphs.steps["replayed"] > NEW // 2


def test_a_second_prompt_taken_in_at_once_after_static_steps_gives_the_eager_tokens():
    """A follow-up prompt of several chunks goes through the forward-at-once prefill (kvtier.prefill), which must
    leave no kept scope behind for the next static step."""
    model, ids, follow_up = tiny_model("llama"), random_ids(150), random_ids(70, seed=9)
    eager, static = caches(model, False), caches(model, True)
    turns = {}
    for name, cache in (("eager", eager), ("static", static)):
        first = generate(model, ids, cache)[0]
        turns[name] = generate(model, torch.cat((ids, first, follow_up), dim=1), cache)
    assert torch.equal(turns["static"][0], turns["eager"][0])
    torch.testing.assert_close(turns["static"][1], turns["eager"][1], rtol=0, atol=1e-5)
