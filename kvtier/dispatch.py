"""The one module that chooses, per step, between the Triton kernels and their PyTorch references (the library
imports kvtier.kernels nowhere else, and here only inside the kernel path: they need the optional triton package).
Which implementation runs each step: the Triton kernels (kvtier.kernels) on CUDA when Triton is installed and the
config allows them (`kernels="auto"`), the PyTorch references everywhere else (`kernels="reference"` forces them;
`kernels="triton"` forces the kernels, on a CPU through Triton's interpreter). A policy's summaries and selections
take the kernel path only where it declares a kernel for them (Policy.kernel_summary / kernel_scoring /
kernel_span_scores, which a subclass overriding the methods they replace does not inherit); otherwise its own methods
run.
Both compute the same selections, summaries and scopes (the kernels' tests hold them to their references)."""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from kvtier.config import ReAttentionConfig
from kvtier.policies import Policy, build_policy
from kvtier.prefill import QueryChunk
from kvtier.rotary import ScopeRotary


def kernels_enabled(config: ReAttentionConfig, device: torch.device) -> bool:
    installed = importlib.util.find_spec("triton") is not None
    if config.kernels == "triton" and not installed:
        raise ValueError("kernels='triton' needs the triton package: pip install triton (or use kernels='auto')")
    return config.kernels == "triton" or (config.kernels == "auto" and device.type == "cuda" and installed)


def select(policy: Policy, queries: torch.Tensor, summaries: torch.Tensor, config: ReAttentionConfig,
           use_kernels: bool, layer: int = 0, tokens: int = 0) -> torch.Tensor:
    """queries [B, Hq, q, D] pre-RoPE, summaries [B, Hkv, n, c, D] -> span ids [B, Hsel, k] in scope order (`layer`,
    `tokens`: see Policy.select_at). A policy declaring kernel_span_scores selects itself, calling the kernel given
    as its span_scores_kernel on the kernel path."""
    if use_kernels and policy.kernel_scoring is not None:
        from kvtier.kernels.select import select_spans

        return select_spans(queries, summaries, policy.kernel_scoring, policy.aggregation, policy.votes,
                            config.top_k, config.per_kv_head, use_triton=True, all_heads=policy.all_heads)
    if policy.kernel_span_scores is not None:
        policy.span_scores_kernel = _span_scores_kernel() if use_kernels else None
    return policy.select_at(queries, summaries, config.top_k, config.per_kv_head, layer=layer, tokens=tokens)


def select_chunks(policy: Policy, queries: torch.Tensor, summaries: torch.Tensor, chunks: list[QueryChunk],
                  config: ReAttentionConfig, use_kernels: bool, layer: int = 0) -> list[torch.Tensor]:
    """queries [B, Hq, q, D] of a forward's query chunks (kvtier.prefill), summaries [B, Hkv, n, c, D] of every span
    sealed by its end -> each chunk's span ids [B, Hsel, k] as `select` lays them out, chosen among its first
    `chunk.spans`: the chunks from the first the policy can take with the rest in one pass (Policy.select_chunks; e.g.
    in a prompt's first forward, once consensus' window is full and top_k spans are sealed) in that pass, those
    before it chunk by chunk as `select`."""
    if policy.kernel_span_scores is not None:
        policy.span_scores_kernel = _span_scores_kernel() if use_kernels else None
    chosen = []
    for index, chunk in enumerate(chunks):
        rest = policy.select_chunks(queries, summaries, chunks[index:], config.top_k, config.per_kv_head, layer=layer)
        if rest is not None:
            return chosen + rest
        chosen.append(select(policy, queries[:, :, chunk.start : chunk.end], summaries[:, :, : chunk.spans], config,
                             use_kernels, layer, chunk.tokens))
    return chosen


def _span_scores_kernel() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The kernel computing Policy.span_best_scores (kernel_span_scores "dot")."""
    from kvtier.kernels.window_mass import span_best_scores

    return span_best_scores


def rotate(rotary: ScopeRotary, x: torch.Tensor, start: int, use_kernels: bool) -> torch.Tensor:
    """x [B, H, q, D] pre-RoPE -> rotated at scope positions start..start+q-1, one launch on the kernel path."""
    if use_kernels:
        from kvtier.kernels.rotary import rotate as rotate_kernel

        rotary.check(start, x.shape[-2])
        return rotate_kernel(x, rotary.cos, rotary.sin, start)
    return rotary.rotate(x, start)


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor,
                     scale: float | None) -> torch.Tensor:
    """The static decode step's attention on the kernel path (kvtier.fast_decode): query [B, Hq, 1, D] rotated over
    keys / values [B, Hkv, bound, D] at positions 0..length-1 (length [1] int64 on the device, never read by the
    host) -> [B, 1, Hq, D], two launches. The reference path is SDPA over the masked buffer (fast_attention)."""
    from kvtier.kernels.decode_attention import decode_attention as attend

    return attend(query, keys, values, length, scale)


def summarise(policy: Policy, keys: torch.Tensor, use_kernels: bool) -> torch.Tensor:
    """keys [N, Hkv, S, D] of the spans sealed in one step -> summaries [N, Hkv, c, D], one launch on the kernel path."""
    if use_kernels and policy.kernel_summary is not None:
        from kvtier.kernels.summarise import summarise_spans

        return summarise_spans(keys, policy.kernel_summary, **policy.kernel_summary_options())
    return policy.summarise(keys)


def scope_gather(global_kv: tuple[torch.Tensor, torch.Tensor], local_kv: tuple[torch.Tensor, torch.Tensor],
                 pool: torch.Tensor, host_blocks: list[torch.Tensor], loc: torch.Tensor, rotary: ScopeRotary,
                 out_keys: torch.Tensor, out_values: torch.Tensor) -> None:
    """The kernel path's scope gather: `[global | spans at loc (GPU slot, or -1 - host slot read in place) | local]`
    into out_keys (rotated at 0..L-1) / out_values [B, Hkv, L, D], one launch. The reference path assembles the same
    scope from spans the placement fetched (ReAttentionLayer.gather_scope)."""
    from kvtier.kernels.gather import scope_gather as gather_kernel

    gather_kernel(global_kv, local_kv, pool, host_blocks, loc, rotary.cos, rotary.sin, out_keys, out_values)


def copy_host_spans(pool: torch.Tensor, host_blocks: list[torch.Tensor], slots: torch.Tensor) -> None:
    """The kernel path's promotion: pool[slots[0, i]] = host slot slots[1, i], read in place through UVA (one launch).
    The reference path promotes spans it has already copied to the device (Placement.fetch)."""
    from kvtier.kernels.gather import copy_host_spans as copy_kernel

    copy_kernel(pool, host_blocks, slots)


def precompile_selection(model_config, config: ReAttentionConfig, max_tokens: int, device: torch.device,
                         dtype: torch.dtype, batch: int = 1) -> int | None:
    """Compile, before a run, every variant of the selection kernels that a cache of `config` (resolved) over a
    model of `model_config` reaches on its way to `max_tokens` tokens (kvtier.kernels.warmup), so none is compiled
    inside a timed prefill -> the sealed-span bound it compiled for, or None when the Triton selection does not run
    (no CUDA device, kernels="reference", or a policy without a scoring kernel)."""
    policy = build_policy(config.policy, config.policy_options)
    scored_by_kernel = policy.kernel_scoring is not None or policy.kernel_span_scores is not None
    if device.type != "cuda" or not scored_by_kernel or not kernels_enabled(config, device):
        return None
    from kvtier.kernels.warmup import precompile, precompile_span_scores

    max_spans = -(-max_tokens // config.span_size)  # sealed spans per layer stay below this
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    if policy.kernel_scoring is None:  # consensus: its own selection around the span-score kernel
        precompile_span_scores(batch=batch, q_heads=model_config.num_attention_heads,
                               kv_heads=model_config.num_key_value_heads, head_dim=head_dim,
                               span_size=config.span_size, window=policy.window, max_spans=max_spans, dtype=dtype,
                               device=device)
        return max_spans
    precompile(
        batch=batch, q_heads=model_config.num_attention_heads, kv_heads=model_config.num_key_value_heads,
        head_dim=head_dim, summary_size=policy.summary_size(config.span_size), kind=policy.kernel_scoring,
        aggregation=policy.aggregation, votes=policy.votes, top_k=config.top_k, per_kv_head=config.per_kv_head,
        chunk_size=config.chunk_size, max_spans=max_spans, dtype=dtype, device=device)
    return max_spans
