"""Which implementation runs each step: the Triton kernels (kvtier.kernels) on CUDA when Triton is installed and the
config allows them (`kernels="auto"`), the PyTorch references everywhere else (`kernels="reference"` forces them;
`kernels="triton"` forces the kernels, on a CPU through Triton's interpreter).
Both compute the same selections, summaries and scopes (the kernels' tests hold them to their references)."""
from __future__ import annotations

import importlib.util

import torch

from kvtier.config import ReAttentionConfig
from kvtier.policies import Policy


def kernels_enabled(config: ReAttentionConfig, device: torch.device) -> bool:
    installed = importlib.util.find_spec("triton") is not None
    if config.kernels == "triton" and not installed:
        raise ValueError("kernels='triton' needs the triton package: pip install triton (or use kernels='auto')")
    return config.kernels == "triton" or (config.kernels == "auto" and device.type == "cuda" and installed)


def select(policy: Policy, queries: torch.Tensor, summaries: torch.Tensor, config: ReAttentionConfig,
           use_kernels: bool) -> torch.Tensor:
    """queries [B, Hq, q, D] pre-RoPE, summaries [B, Hkv, n, c, D] -> span ids [B, Hsel, k] ascending."""
    if use_kernels and policy.kernel_scoring is not None:
        from kvtier.kernels.select import select_spans

        return select_spans(queries, summaries, policy.kernel_scoring, policy.aggregation, policy.votes,
                            config.top_k, config.per_kv_head, use_triton=True)
    return policy.select(queries, summaries, config.top_k, config.per_kv_head)


def summarise(policy: Policy, keys: torch.Tensor, use_kernels: bool) -> torch.Tensor:
    """keys [N, Hkv, S, D] of the spans sealed in one step -> summaries [N, Hkv, c, D], one launch on the kernel path."""
    if use_kernels and policy.kernel_summary is not None:
        from kvtier.kernels.summarise import summarise_spans

        return summarise_spans(keys, policy.kernel_summary, getattr(policy, "representatives", 4))
    return policy.summarise(keys)
