"""A prefill forward's query chunks at one layer, planned before any of them attends: where each chunk's queries are,
the spans sealed before it and its local window. With the plan, the layer takes the forward's K/V in and seals its
spans at once, and a policy that can selects every chunk's spans in one pass, instead of chunk by chunk (each step
costs the host a few dozen launches: issue 17's prefill profile). The chunks see exactly what they would one by one."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvtier.buffers import upload
from kvtier.regions import spans_to_seal


@dataclass(frozen=True)
class QueryChunk:
    start: int  # the chunk's queries are [start, end) of the forward's
    end: int
    spans: int  # spans sealed before it attends: it selects among the first `spans` of the layer's table
    local: slice  # its local window, in the forward's stream `[local window before the forward | new tokens]`
    tokens: int  # tokens held up to its end (Policy.select_at's `tokens`)


def chunk_bounds(seen: int, n_queries: int, chunk_size: int) -> list[tuple[int, int]]:
    """The [start, end) of each query chunk of a forward bringing n_queries tokens, `seen` held after it: cut where the
    tokens held reach a multiple of chunk_size (so a prompt fed in pieces of a multiple of chunk_size is chunked as
    when fed whole) and at the forward's end."""
    first = chunk_size - (seen - n_queries) % chunk_size  # queries up to the next multiple of chunk_size held
    if n_queries <= first:
        return [(0, n_queries)]
    starts = (0, *range(first, n_queries, chunk_size))
    return [(start, min(start + chunk_size if start else first, n_queries)) for start in starts]


def plan_chunks(bounds: list[tuple[int, int]], local_held: int, spans_held: int, global_tokens: int, local_size: int,
                span_size: int, seal_group: int) -> tuple[list[QueryChunk], int]:
    """The chunks of `bounds` for a layer holding `global_tokens` (its global region full), `spans_held` sealed spans
    and `local_held` tokens in its local window before the forward -> (the chunks, the stream tokens sealed by the
    forward's end, a multiple of span_size). Each chunk seals, before it attends, what ReAttentionLayer.ingest would
    chunk by chunk (kvtier.regions.spans_to_seal)."""
    chunks, sealed = [], 0
    for start, end in bounds:
        stop = local_held + end  # the stream's tokens up to the chunk's end
        spans = spans_held + sealed // span_size
        sealed += spans_to_seal(spans, stop - sealed, local_size, span_size, seal_group) * span_size
        chunks.append(QueryChunk(start, end, spans_held + sealed // span_size, slice(sealed, stop),
                                 global_tokens + spans_held * span_size + stop))
    return chunks, sealed


@functools.lru_cache(maxsize=16)
def padded_index(ranges: tuple[tuple[int, int], ...], width: int, device: torch.device) -> torch.Tensor:
    """Each non-empty [start, end) of `ranges` as `width` indices, the last one repeated past its end: the rows of
    chunks of different lengths laid out side by side -> [len(ranges) * width] int64 on `device`. Every layer of a
    forward asks the same: built once."""
    bounds = torch.tensor(ranges).view(-1, 2)  # [m, 2]
    index = torch.minimum(bounds[:, :1] + torch.arange(width), bounds[:, 1:] - 1)  # [m, width]
    return upload(index.flatten(), device)


@functools.lru_cache(maxsize=16)
def unpadded_positions(lengths: tuple[int, ...], width: int, device: torch.device) -> torch.Tensor:
    """Where the real entries sit among rows of `width` padded from rows of `lengths` -> [sum(lengths)] int64 on
    `device`."""
    real = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # [m, width]
    return upload(real.flatten().nonzero().flatten(), device)
