"""attention_backend: the config's choices; the choice between FlashAttention and SDPA (kvtier.flash) with the
packages faked on the CPU; kvtier's plumbing into a flash_attn_func (layouts, scaling, its tuple) through a fake one
built on SDPA; and, on a CUDA machine with flash-attn-4, the real kernel against SDPA."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kvtier import ReAttentionCache, ReAttentionConfig, attention, flash
from kvtier.attention import _attend
from kvtier.flash import FIX, FlashKernel, choose_flash
from tests.conftest import greedy, random_ids, tiny_model
from tests.core.test_scope import TINY

CPU = torch.device("cpu")


def fake_flash_attn_func(q, k, v, softmax_scale=None, causal=False):
    """flash_attn_func's contract on SDPA, for the CPU (tests kvtier's plumbing, not flash-attn): q [B, c, Hq, D],
    k / v [B, L, Hkv, D] (GQA) -> (out [B, c, Hq, D], lse [B, Hq, c]) as flash-attn-4 returns, causal aligned
    bottom-right: query t sees keys 0..L-c+t."""
    assert causal and q.shape[0] == k.shape[0] and q.shape[2] % k.shape[2] == 0 and q.shape[3] == k.shape[3]
    n_queries, length = q.shape[1], k.shape[1]
    mask = torch.ones(n_queries, length, dtype=torch.bool, device=q.device).tril(length - n_queries)  # [c, L]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale, enable_gqa=True)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(-1, -2)) * scale  # [B, Hq, c, L]
    lse = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)  # [B, Hq, c]
    return out.transpose(1, 2).contiguous(), lse


def fake_kernel(function=fake_flash_attn_func, package="fake flash-attn-4", archs=(9, 10), head_dims=(64, 96, 128)):
    return FlashKernel(package, function, archs, frozenset(head_dims))


@pytest.fixture(autouse=True)
def fresh_choices():
    """Choices are cached per process; each test makes its own (and leaves none of its fakes behind)."""
    choose_flash.cache_clear()
    yield
    choose_flash.cache_clear()


def fake_installed(monkeypatch, kernels=(), missing=("flash-attn-4 is not importable (ModuleNotFoundError)",),
                   arch=None):
    """kvtier.flash sees `kernels` installed (and `missing` not), on a CUDA device of compute capability `arch`."""
    monkeypatch.setattr(flash, "installed", lambda: (tuple(kernels), tuple(missing)))
    monkeypatch.setattr(flash, "_arch", lambda device: arch)


# ---- the config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["flash-attn", "FLASH", "", None, 1])
def test_an_unknown_attention_backend_names_the_choices(value):
    with pytest.raises(ValueError, match=r"attention_backend must be one of \('auto', 'flash', 'sdpa'\), got"):
        ReAttentionConfig(attention_backend=value).resolve(8192)


@pytest.mark.parametrize("value", ["auto", "flash", "sdpa"])
def test_every_attention_backend_resolves_and_round_trips(value, tmp_path):
    config = ReAttentionConfig(attention_backend=value).resolve(8192)  # "flash" is checked where it runs, not here
    config.to_file(tmp_path / "kv.yaml")
    assert ReAttentionConfig.from_file(tmp_path / "kv.yaml").attention_backend == value
    assert ReAttentionConfig().attention_backend == "auto"


# ---- the choice -----------------------------------------------------------------------------------------------------
def test_flash_without_a_package_names_the_fix(monkeypatch):
    fake_installed(monkeypatch)
    with pytest.raises(ValueError, match=r"attention_backend='flash' cannot run here: flash-attn-4 is not importable"):
        choose_flash("flash", CPU, torch.bfloat16, 64)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"pip install flash-attn-4.*attention_backend='auto'"):
        greedy(model, random_ids(20), ReAttentionCache(model, attention_backend="flash", **TINY), new_tokens=2)


@pytest.mark.parametrize("arch,dtype,head_dim,reason", [
    (None, torch.bfloat16, 64, r"on CUDA devices only \(compute capability 9\.x or 10\.x\)"),
    (8, torch.bfloat16, 64, r"on compute capability 9\.x or 10\.x, not 8\.x"),
    (9, torch.float32, 64, r"in float16/bfloat16, not torch\.float32"),
    (9, torch.float16, 80, r"for head_dim \[64, 96, 128\], not 80"),
])
def test_flash_where_the_installed_kernel_cannot_run_says_why(monkeypatch, arch, dtype, head_dim, reason):
    fake_installed(monkeypatch, [fake_kernel()], missing=(), arch=arch)
    expected = rf"cannot run here: fake flash-attn-4 (runs|is used) {reason}\. Fix: {re.escape(FIX)}$"
    with pytest.raises(ValueError, match=expected):
        choose_flash("flash", CPU, dtype, head_dim)
    assert choose_flash("auto", CPU, dtype, head_dim) is None  # "auto" falls back to SDPA


def test_auto_takes_the_first_installed_kernel_that_runs_for_chunks_and_sdpa_takes_none(monkeypatch):
    four, two = fake_kernel(), fake_kernel(package="fake flash-attn 2.x", archs=(8, 9), head_dims=range(8, 257, 8))
    fake_installed(monkeypatch, [four, two], missing=(), arch=9)
    assert choose_flash("auto", CPU, torch.bfloat16, 128) is four
    assert choose_flash("flash", CPU, torch.float16, 64) is four
    assert choose_flash("auto", CPU, torch.bfloat16, 256) is two  # beyond flash-attn-4's head sizes
    assert choose_flash("sdpa", CPU, torch.bfloat16, 128) is None
    assert choose_flash("auto", CPU, torch.bfloat16, 128, True) is None  # decode steps: SDPA is faster
    assert choose_flash("flash", CPU, torch.bfloat16, 128, True) is four
    monkeypatch.setattr(flash, "_arch", lambda device: 8)
    choose_flash.cache_clear()
    assert choose_flash("auto", CPU, torch.bfloat16, 128) is two  # Ampere: flash-attn 2.x only


def test_the_choice_is_made_once_per_setting_device_dtype_and_head_dim(monkeypatch):
    calls = []
    fake_installed(monkeypatch, arch=9)
    monkeypatch.setattr(flash, "installed", lambda: calls.append(1) or ((fake_kernel(),), ()))
    first = choose_flash("auto", CPU, torch.bfloat16, 64)
    assert choose_flash("auto", CPU, torch.bfloat16, 64) is first and len(calls) == 1
    choose_flash("auto", CPU, torch.bfloat16, 128)
    assert len(calls) == 2


def test_flash_is_looked_up_on_first_use_only():
    """kvtier.flash imports no FlashAttention package at import time (only a choice does)."""
    code = "import sys, kvtier.attention; print('flash_attn' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_auto_on_the_cpu_is_sdpa_with_the_same_tokens():
    assert choose_flash("auto", CPU, torch.float32, 16) is None
    model = tiny_model("llama")
    ids = random_ids(90)  # well beyond the scope bound of TINY (40): spans are selected
    auto = greedy(model, ids, ReAttentionCache(model, attention_backend="auto", **TINY), new_tokens=20)
    sdpa = greedy(model, ids, ReAttentionCache(model, attention_backend="sdpa", **TINY), new_tokens=20)
    assert torch.equal(auto, sdpa)


# ---- kvtier's plumbing through a fake flash_attn_func (not flash-attn itself) -------------------------------------
@pytest.mark.parametrize("n_queries,length", [(5, 19), (1, 19), (7, 7)])
@pytest.mark.parametrize("scaling", [None, 0.3])
@pytest.mark.parametrize("returns_lse", [True, False], ids=["flash-attn-4 (out, lse)", "flash-attn 2.x out"])
def test_the_flash_path_gives_the_sdpa_output(n_queries, length, scaling, returns_lse):
    seen = []

    def recording(q, k, v, softmax_scale=None, causal=False):
        seen.append((q.shape, k.shape, softmax_scale))
        out, lse = fake_flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal)
        return (out, lse) if returns_lse else out

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, n_queries, 16, generator=generator)  # [B, Hq, c, D]: 3 query heads per KV head
    k, v = torch.randn(2, 2, 2, length, 16, generator=generator)  # [B, Hkv, L, D]
    ours = _attend(q, k, v, scaling, fake_kernel(recording))
    assert seen == [((2, n_queries, 6, 16), (2, length, 2, 16), scaling)]  # the flash layout, the model's scaling
    torch.testing.assert_close(ours, _attend(q, k, v, scaling), rtol=0, atol=1e-5)
    assert ours.shape == (2, n_queries, 6, 16)  # [B, c, Hq, D] as the SDPA path returns


def test_a_model_through_the_fake_flash_kernel_gives_the_sdpa_tokens(monkeypatch):
    """The whole scope path (chunked prefill, spans selected, decode) with attention_backend='flash' routed to the fake
    flash_attn_func gives SDPA's tokens: the backend reaches every attention call, in chunks and decode steps."""
    calls = []

    def counting(q, k, v, softmax_scale=None, causal=False):
        calls.append(q.shape[1])
        return fake_flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal)

    real = attention.choose_flash
    monkeypatch.setattr(attention, "choose_flash", lambda backend, *args: (
        fake_kernel(counting) if backend == "flash" else real(backend, *args)))
    model = tiny_model("llama")
    ids = random_ids(90)
    ours = greedy(model, ids, ReAttentionCache(model, attention_backend="flash", **TINY), new_tokens=20)
    sdpa = greedy(model, ids, ReAttentionCache(model, attention_backend="sdpa", **TINY), new_tokens=20)
    assert torch.equal(ours, sdpa)
    layers = model.config.num_hidden_layers
    assert calls == ([12] * 7 + [6]) * layers + [1] * 19 * layers  # the prefill's chunks per layer, then decode steps


# ---- the real kernel on a GPU -------------------------------------------------------------------------------------
def _flash_attn_4_here() -> bool:
    return torch.cuda.is_available() and any(k.package == "flash-attn-4" for k in flash.installed()[0])


needs_flash_attn_4 = pytest.mark.skipif(not _flash_attn_4_here(),
                                        reason="needs CUDA and flash-attn-4 (flash_attn.cute)")


@needs_flash_attn_4
@pytest.mark.gpu
@pytest.mark.parametrize("n_queries,length,q_heads,kv_heads,head_dim", [
    (512, 4096, 9, 3, 64),  # a SmolLM2-135M query chunk over its scope
    (512, 8160, 32, 8, 128),  # a Llama-3.1-8B query chunk over a ~8K scope
    (1, 8160, 32, 8, 128),  # its decode step
], ids=["smollm2-chunk", "8b-chunk", "8b-decode"])
def test_flash_attn_4_matches_sdpa_on_scope_shapes(n_queries, length, q_heads, kv_heads, head_dim):
    cuda = torch.device("cuda")
    kernel = choose_flash("flash", cuda, torch.bfloat16, head_dim)
    assert kernel.package == "flash-attn-4" and choose_flash("auto", cuda, torch.bfloat16, head_dim) is kernel
    assert choose_flash("auto", cuda, torch.bfloat16, head_dim, True) is None  # decode steps stay on SDPA
    generator = torch.Generator(device=cuda).manual_seed(0)
    q = torch.randn(1, q_heads, n_queries, head_dim, generator=generator, device=cuda, dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, kv_heads, length, head_dim, generator=generator, device=cuda, dtype=torch.bfloat16)
    scaling = head_dim**-0.5
    with torch.inference_mode():
        ours, sdpa = _attend(q, k, v, scaling, kernel), _attend(q, k, v, scaling)
    assert ours.shape == sdpa.shape == (1, n_queries, q_heads, head_dim)
    assert (ours.float() - sdpa.float()).abs().max().item() <= 2e-2


@needs_flash_attn_4
@pytest.mark.gpu
def test_a_bf16_llama_on_flash_attn_4_follows_sdpa():
    """A tiny random Llama (head_dim 64) in bf16 on CUDA, a prompt beyond the scope then 20 decode steps, every token
    fed to both caches alike: the logits of flash-attn-4 and SDPA agree to bf16 noise at every step. Logits, not greedy
    tokens: a random model's logits are near ties, which bf16 rounding flips between two correct kernels."""
    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2)  # head_dim 64
    model = model.to("cuda", torch.bfloat16)
    ids = random_ids(120 + 20).cuda()
    caches = {name: ReAttentionCache(model, attention_backend=name, **TINY) for name in ("flash", "sdpa")}
    logits = {name: [] for name in caches}
    with torch.inference_mode():
        for name, cache in caches.items():
            out = model(ids[:, :120], past_key_values=cache, use_cache=True)
            logits[name].append(out.logits[0, -1].float())
            for step in range(120, 140):
                out = model(ids[:, step : step + 1], past_key_values=cache, use_cache=True)
                logits[name].append(out.logits[0, -1].float())
    flash_logits, sdpa_logits = torch.stack(logits["flash"]), torch.stack(logits["sdpa"])  # [21, V]
    scale = sdpa_logits.abs().max().item()
    assert (flash_logits - sdpa_logits).abs().max().item() <= 2e-2 * scale
