"""kernels.summarise.summarise_spans against the policies' own `summarise` (mean, quest, infllm). On a CPU-only
machine the kernel runs in Triton's interpreter (tests/conftest.py)."""
from __future__ import annotations

import zlib

import pytest
import torch

from kvtier.kernels.summarise import METHODS, summarise_spans, summarise_spans_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sealed_keys(n_spans: int, heads: int, span: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Random keys [N, Hkv, S, D] as the layer seals them: the K half of span-major [N, 2, Hkv, S, D] spans."""
    seed = zlib.crc32(repr((n_spans, heads, span, head_dim, dtype)).encode())
    spans = torch.randn(n_spans, 2, heads, span, head_dim, generator=torch.Generator().manual_seed(seed))
    return spans.to(dtype=dtype, device=DEVICE)[:, 0]


def assert_summarises_like_reference(keys: torch.Tensor, method: str, representatives: int = 4) -> None:
    out = summarise_spans(keys, method, representatives)
    expected = summarise_spans_reference(keys, method, representatives)
    assert out.shape == expected.shape and out.dtype == keys.dtype
    if method == "mean":  # fp32 sums in another order, then one rounding (the interpreter truncates fp32 -> bf16)
        summing = keys.shape[2] * torch.finfo(torch.float32).eps * keys.float().abs().amax().item()
        torch.testing.assert_close(out.float(), expected.float(), rtol=torch.finfo(keys.dtype).eps, atol=summing)
    elif method == "minmax":
        assert torch.equal(out, expected)
    else:  # a pick may differ only where the r-th and (r+1)-th closest keys tie within fp32 summation error
        differs = (out != expected).flatten(2).any(-1)  # [N, Hkv]
        assert not (differs & ~near_ties(keys, out.shape[2])).any()


def near_ties(keys: torch.Tensor, count: int) -> torch.Tensor:
    """keys [N, Hkv, S, D] -> [N, Hkv] bool: whether the count-th and (count+1)-th closeness (fp64) nearly tie."""
    if count == keys.shape[2]:
        return torch.zeros(keys.shape[:2], dtype=torch.bool, device=keys.device)
    keys64 = keys.double()
    closeness = (keys64 * keys64.mean(dim=2, keepdim=True)).sum(-1)  # [N, Hkv, S]
    best = closeness.topk(count + 1, dim=-1).values
    return best[..., -2] - best[..., -1] <= 1e-5 * closeness.abs().amax(-1)


CASES = [  # spans, KV heads, span size, head_dim, dtype
    (1, 3, 16, 64, torch.bfloat16),
    (3, 8, 32, 128, torch.float32),
    (10, 3, 64, 128, torch.bfloat16),
    (3, 3, 64, 64, torch.float32),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_spans,heads,span,head_dim,dtype", CASES)
def test_matches_reference(n_spans, heads, span, head_dim, dtype, method):
    assert_summarises_like_reference(sealed_keys(n_spans, heads, span, head_dim, dtype), method)


@pytest.mark.parametrize("representatives", [1, 7, 40])  # 40 > S: every key, in order
def test_representatives_of_a_span_size_off_powers_of_two(representatives):
    assert_summarises_like_reference(sealed_keys(2, 3, 24, 64, torch.float32), "representatives", representatives)


def test_representatives_ties_go_to_the_lower_position():
    """Keys come in pairs that swap their two halves; small integers keep every dot product exact, so each pair ties
    with the mean key (which is the same in both halves) and only the positions break the ties."""
    halves = torch.randint(-3, 4, (3, 8, 2, 32), generator=torch.Generator().manual_seed(5)).float()  # [Hkv, S/2, 2, D/2]
    first, second = halves[:, :, 0], halves[:, :, 1]
    pairs = torch.stack((torch.cat((first, second), -1), torch.cat((second, first), -1)), dim=2)  # [Hkv, S/2, 2, D]
    keys = pairs.flatten(1, 2)[None].to(device=DEVICE, dtype=torch.bfloat16)  # [1, Hkv, S, D]
    closeness = (keys.float() * keys.float().mean(dim=2, keepdim=True)).sum(-1)  # [1, Hkv, S]
    picks = closeness.argsort(dim=-1, descending=True, stable=True)[..., :5].sort(dim=-1).values
    expected = keys.gather(2, picks[..., None].expand(-1, -1, -1, keys.shape[-1]))
    assert torch.equal(summarise_spans(keys, "representatives", 5), expected)


def test_no_spans_gives_an_empty_summary():
    assert summarise_spans(sealed_keys(0, 3, 16, 64, torch.float32), "minmax").shape == (0, 3, 2, 64)


BAD_INPUTS = {
    "method must be one of": lambda keys: summarise_spans(keys, "median"),
    "representatives must be a positive integer": lambda keys: summarise_spans(keys, "representatives", 0),
    r"keys must be \[N, Hkv, S, D\]": lambda keys: summarise_spans(keys[0], "mean"),
    "keys dtype": lambda keys: summarise_spans(keys.to(torch.int32), "minmax"),
    "at least one token": lambda keys: summarise_spans(keys[:, :, :0], "mean"),
    "unit stride": lambda keys: summarise_spans(keys.transpose(2, 3), "mean"),
}


@pytest.mark.parametrize("message", list(BAD_INPUTS))
def test_bad_input_raises(message):
    with pytest.raises(ValueError, match=message):
        BAD_INPUTS[message](sealed_keys(2, 3, 16, 64, torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_spans,heads,span,head_dim", [(256, 8, 32, 128), (512, 3, 64, 64)])
def test_full_size_matches_reference(n_spans, heads, span, head_dim, method):
    assert_summarises_like_reference(sealed_keys(n_spans, heads, span, head_dim, torch.bfloat16), method)
