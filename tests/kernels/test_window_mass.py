"""The consensus policy's span scores (kvtier.kernels.window_mass) against their PyTorch reference, the policy's own
code: within fp32 accumulation error, on the span table's views and any query strides; their block sizes shared
across a span bucket; and the policy's selections and a tiny model's tokens on the kernel path (kvtier.dispatch,
kernels="triton") equal to the reference path's. Inputs are drawn fresh per test, seeded from the test's id: random
scores leave the selection boundaries far apart next to fp32 accumulation error."""
from __future__ import annotations


import pytest
import torch

from kvtier import ReAttentionCache, ReAttentionConfig, dispatch
from kvtier.kernels import window_mass
from kvtier.kernels.window_mass import span_best_scores, span_best_scores_reference, window_blocks
from kvtier.policies import build_policy
from tests.conftest import greedy, random_ids, tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


pytestmark = pytest.mark.usefixtures("one_torch_thread", "cpu_cases_run_interpreted")


def _draw(gen, batch, kv_heads, group, w, n_spans, span, dim, dtype, query_dtype=None, spare=3):
    """Centred queries [B, Hkv, g, w, D] in query_dtype (default: dtype) and keys [B, Hkv, n, S, D] in dtype: the
    first n spans of a table holding `spare` more, a view that is not contiguous, as the span table hands it over."""
    device = gen.device
    queries = torch.randn(batch, kv_heads, group, w, dim, generator=gen, device=device)
    if w > 1:
        queries = queries - queries.mean(3, keepdim=True)
    table = torch.randn(batch, kv_heads, n_spans + spare, span, dim, generator=gen, device=device)
    return queries.to(query_dtype or dtype), table.to(dtype).narrow(2, 0, n_spans)


def _check(queries, keys, **blocks):
    """The kernel against the reference run in fp32 (products of bf16 / fp16 inputs exact there too)."""
    best = span_best_scores(queries, keys, **blocks)
    assert best.dtype == torch.float32 and best.is_contiguous()
    assert best.shape == (*queries.shape[:4], keys.shape[2])
    torch.testing.assert_close(best, span_best_scores_reference(queries.float(), keys), rtol=1e-5, atol=1e-4)


# ---- against the reference ----------------------------------------------------------------------------------------
CASES = [  # batch, kv_heads, group, w, n_spans, span, dim, dtype, query_dtype, block_spans, keys_per_dot
    (1, 2, 2, 8, 5, 4, 16, torch.float32, None, None, None),  # one program
    (2, 1, 3, 5, 19, 8, 32, torch.bfloat16, None, 4, 16),  # 5 programs of 2 dots, the last one partial
    (2, 2, 3, 8, 40, 4, 32, torch.bfloat16, torch.float32, 8, 16),  # fp32 queries over bf16 keys (the CPU path)
    (1, 3, 3, 1, 7, 8, 16, torch.float16, None, None, None),  # a window of one query
    (2, 2, 2, 6, 13, 6, 16, torch.float32, None, 4, 16),  # spans of 6 keys, padded to 8
    (1, 2, 3, 7, 33, 4, 32, torch.bfloat16, None, 2, 32),  # 2 spans per program, one tl.dot of 8 spans: masked
]


@pytest.mark.parametrize(
    "batch, kv_heads, group, w, n_spans, span, dim, dtype, query_dtype, block_spans, keys_per_dot", CASES,
    ids=[f"B{c[0]}-{c[1]}x{c[2]}-w{c[3]}-n{c[4]}-S{c[5]}-D{c[6]}-{str(c[7])[6:]}" + ("-fp32q" if c[8] else "")
         for c in CASES],
)
def test_span_scores_match_the_reference(seed, batch, kv_heads, group, w, n_spans, span, dim, dtype, query_dtype,
                                         block_spans, keys_per_dot):
    gen = torch.Generator().manual_seed(seed)
    queries, keys = _draw(gen, batch, kv_heads, group, w, n_spans, span, dim, dtype, query_dtype)
    assert not keys.is_contiguous()
    _check(queries, keys, block_spans=block_spans, keys_per_dot=keys_per_dot)


def test_a_group_larger_than_a_program_splits_its_rows(seed, monkeypatch):
    monkeypatch.setattr(window_mass, "MAX_ROWS", 16)
    gen = torch.Generator().manual_seed(seed)
    queries, keys = _draw(gen, 2, 2, 3, 8, 11, 4, 16, torch.bfloat16)  # 24 rows: 2 tiles of 16
    assert window_blocks(11, 24, 4, 16, 4).block_r == 16
    _check(queries, keys)


def test_strided_queries_score_as_contiguous(seed):
    """A view of the window with g and w swapped in memory (and no copy) gives the same scores, bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    queries, keys = _draw(gen, 2, 2, 3, 5, 9, 4, 16, torch.bfloat16)
    strided = queries.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous()
    assert torch.equal(span_best_scores(strided, keys), span_best_scores(queries, keys))


@pytest.mark.parametrize("w, n_spans", [(4, 0), (0, 5)])
def test_nothing_to_score_is_empty(w, n_spans):
    best = span_best_scores(torch.randn(1, 2, 3, w, 16), torch.randn(1, 2, n_spans, 4, 16))
    assert best.shape == (1, 2, 3, w, n_spans) and best.dtype == torch.float32


# ---- compiled variants --------------------------------------------------------------------------------------------
def test_every_span_count_of_a_bucket_shares_its_blocks():
    for bucket in (1, 2, 64, 1024, 65536):
        assert len({window_blocks(n, 192, 32, 64, 2) for n in range(bucket // 2 + 1, bucket + 1)}) == 1, bucket


@pytest.mark.parametrize("rows, span, dim, element_size", [
    (192, 32, 64, 2), (256, 32, 128, 2), (256, 32, 128, 4), (512, 32, 128, 2), (3, 4, 16, 4), (24, 6, 32, 2),
])
def test_a_growing_context_compiles_few_variants_of_bounded_tiles(rows, span, dim, element_size):
    """SmolLM2 (3 query heads per KV head, window 64, D 64) and Llama-8B (4, D 128; fp32; 8 heads per KV head as
    in Llama-70B) up to 40000 spans; tiny shapes."""
    variants = {window_blocks(n, rows, span, dim, element_size) for n in range(1, 40001)}
    assert len(variants) <= 7
    for blocks in variants:
        assert blocks.block_n % blocks.dot_spans == 0
        assert blocks.dot_spans * blocks.s_pad >= 16 and blocks.block_r >= 16 and blocks.d_pad >= 16
        assert blocks.block_r <= window_mass.MAX_ROWS
        assert blocks.block_r * blocks.d_pad * element_size <= window_mass.QUERY_TILE_BYTES


# ---- bad inputs ---------------------------------------------------------------------------------------------------
BAD = [
    ("queries rank", dict(queries=torch.randn(1, 2, 3, 16)), r"queries must be \[B, Hkv, g, w, D\]"),
    ("keys rank", dict(keys=torch.randn(1, 2, 5, 16)), r"keys must be \[B, Hkv, n, S, D\]"),
    ("heads", dict(keys=torch.randn(1, 3, 5, 4, 16)), "do not match queries"),
    ("head_dim", dict(keys=torch.randn(1, 2, 5, 4, 32)), "do not match queries"),
    ("dtype", dict(queries=torch.randn(1, 2, 3, 4, 16).bfloat16()), "queries that dtype or float32"),
    ("float64", dict(keys=torch.randn(1, 2, 5, 4, 16).double()), "keys must be one dtype of"),
    ("query stride", dict(queries=torch.randn(1, 2, 3, 4, 32)[..., ::2]), "unit stride along head_dim"),
    ("key stride", dict(keys=torch.randn(1, 2, 5, 4, 32)[..., ::2]), "unit stride along head_dim"),
]


@pytest.mark.parametrize("change, message", [(c, m) for _, c, m in BAD], ids=[n for n, _, _ in BAD])
def test_span_best_scores_rejects_bad_inputs(change, message):
    args = dict(queries=torch.randn(1, 2, 3, 4, 16), keys=torch.randn(1, 2, 5, 4, 16))
    with pytest.raises(ValueError, match=message):
        span_best_scores(**{**args, **change})


def test_the_kernel_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        span_best_scores(torch.randn(1, 2, 3, 4, 16), torch.randn(1, 2, 5, 4, 16))


# ---- the policy on the kernel path --------------------------------------------------------------------------------
@pytest.fixture
def kernel_calls(monkeypatch) -> list:
    """The span_best_scores launches that dispatch hands the policy, one entry per launch."""
    calls = []
    launch = window_mass.span_best_scores

    def spy(queries, keys):
        calls.append(1)
        return launch(queries, keys)

    monkeypatch.setattr(window_mass, "span_best_scores", spy)
    return calls


def _selections(gen, config, use_kernels, hq, kv_heads, dim, span, n_spans, dtype, device):
    """Two chunks of 12 queries through 3 layers each, then 4 decode steps through layer 0 (refresh 1: every other
    step re-scores), all on one fresh consensus policy through dispatch.select -> the ids of all 10 calls, of which
    8 score the spans."""
    policy = build_policy("consensus", {"window": 8, "refresh": 1})
    ids = []
    for tokens, n_queries, layers in ((60, 12, 3), (72, 12, 3), (73, 1, 1), (74, 1, 1), (75, 1, 1), (76, 1, 1)):
        for layer in range(layers):
            queries = torch.randn(1, hq, n_queries, dim, generator=gen, device=device).to(dtype)
            table = torch.randn(1, kv_heads, n_spans + 2, span, dim, generator=gen, device=device).to(dtype)
            ids.append(dispatch.select(policy, queries, table.narrow(2, 0, n_spans), config, use_kernels, layer,
                                       tokens))
    assert (policy.span_scores_kernel is not None) == use_kernels
    return ids


SELECT_CASES = [  # hq, kv_heads, dim, span, n_spans, per_kv_head, dtype
    (6, 2, 16, 4, 30, False, torch.float32),
    (9, 3, 32, 8, 21, True, torch.bfloat16),
]


def _check_select(seed, hq, kv_heads, dim, span, n_spans, per_kv_head, dtype, *, device, calls):
    config = ReAttentionConfig(global_size=4, local_size=64, span_size=span, top_k=5, chunk_size=12,
                               per_kv_head=per_kv_head, kernels="triton").resolve(4096)
    assert dispatch.kernels_enabled(config, torch.device(device))
    selections = []
    for use_kernels in (False, True):
        gen = torch.Generator(device=device).manual_seed(seed)  # the same inputs on both paths
        selections.append(_selections(gen, config, use_kernels, hq, kv_heads, dim, span, n_spans, dtype, device))
    reference, kernel = selections
    assert len(kernel) == 10 and len(calls) == 8
    for got, want in zip(kernel, reference):
        assert got.shape == (1, kv_heads if per_kv_head else 1, 5)
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", SELECT_CASES, ids=[f"{c[0]}x{c[1]}-D{c[2]}-{str(c[6])[6:]}" for c in SELECT_CASES])
def test_consensus_selects_on_the_kernel_path_what_the_reference_path_selects(seed, kernel_calls, case):
    _check_select(seed, *case, device="cpu", calls=kernel_calls)


def test_a_tiny_model_generates_the_same_tokens_on_both_paths(kernel_calls):
    model = tiny_model("llama")
    ids = random_ids(100, seed=5)
    options = dict(policy="consensus", global_size=4, local_size=24, span_size=4, top_k=3, chunk_size=12)
    reference = greedy(model, ids, ReAttentionCache(model, **options, kernels="reference"), new_tokens=8)
    assert not kernel_calls
    kernel = greedy(model, ids, ReAttentionCache(model, **options, kernels="triton"), new_tokens=8)
    assert kernel_calls
    assert torch.equal(kernel, reference)


# ---- full size, on the GPU ----------------------------------------------------------------------------------------
GPU_CASES = [  # batch, kv_heads, group, w, n_spans, span, dim, dtype
    (1, 3, 3, 64, 40000, 32, 64, torch.bfloat16),  # SmolLM2 at 1.28M tokens
    (1, 8, 4, 64, 32768, 32, 128, torch.bfloat16),  # Llama-3.1-8B at 1M tokens
    (2, 3, 3, 64, 4097, 32, 64, torch.bfloat16),  # a batch of 2, one span into a new bucket
    (1, 8, 4, 64, 8192, 32, 128, torch.float32),
    (1, 3, 3, 1, 1000, 32, 64, torch.bfloat16),  # a window of one query
]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch, kv_heads, group, w, n_spans, span, dim, dtype", GPU_CASES,
    ids=[f"B{c[0]}-{c[1]}x{c[2]}-w{c[3]}-n{c[4]}-D{c[6]}-{str(c[7])[6:]}" for c in GPU_CASES],
)
def test_full_size_span_scores_on_gpu(seed, batch, kv_heads, group, w, n_spans, span, dim, dtype):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    _check(*_draw(gen, batch, kv_heads, group, w, n_spans, span, dim, dtype))


@needs_cuda
@pytest.mark.gpu
def test_full_size_span_scores_of_fp32_queries_over_bf16_keys_on_gpu(seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    _check(*_draw(gen, 1, 8, 4, 64, 8192, 32, 128, torch.bfloat16, torch.float32))


@needs_cuda
@pytest.mark.gpu
def test_full_size_consensus_selects_on_the_kernel_path_what_the_reference_path_selects_on_gpu(seed, kernel_calls):
    """fp32 keys: the reference path's einsum then runs in fp32 too (in bf16 it rounds each score to bf16, which
    the kernel does not)."""
    _check_select(seed, 9, 3, 64, 32, 4096, False, torch.float32, device="cuda", calls=kernel_calls)
