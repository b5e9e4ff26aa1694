"""Timing a model's forwards into a cache: one greedy step, the chunked prefill and the timed decode loop every
benchmark runs, and the CUDA kernels and copies a step launches."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm

from kvtier.hf import cache_keyword


def sync() -> None:
    """Wait for the queued work of every GPU (a model spread by a device_map ends its forward on another GPU than it
    starts on); no-op without CUDA."""
    for device in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.synchronize(device)


def step(model, cache, tokens: torch.Tensor, keyword: str | None = None) -> torch.Tensor:
    """One forward of tokens [B, n] into `cache` (a decode step when n = 1) -> the greedy next token [B, 1].
    `keyword`: the model's cache argument (kvtier.hf.cache_keyword), when the caller looked it up once."""
    logits = model(input_ids=tokens, logits_to_keep=1, **{keyword or cache_keyword(model): cache}).logits  # [B, 1, V]
    return logits[:, -1:].argmax(-1)


def prefill(model, cache, ids: torch.Tensor, chunk: int, desc: str | None = None,
            forward_ms: list[float] | None = None) -> float:
    """A chunked prefill of ids [B, T] into `cache`, `chunk` tokens per forward -> seconds, waiting for the GPU before
    and after. `desc` shows a progress bar; `forward_ms`, when given, receives each forward's milliseconds (waiting for
    the GPU after each: one synchronisation per forward)."""
    keyword = cache_keyword(model)
    sync()
    began = last = time.perf_counter()
    with torch.inference_mode():
        for start in tqdm(range(0, ids.shape[1], chunk), desc=desc, unit="chunk", leave=False, disable=desc is None):
            model(input_ids=ids[:, start:start + chunk], logits_to_keep=1, **{keyword: cache})
            if forward_ms is not None:
                sync()
                now = time.perf_counter()
                forward_ms.append((now - last) * 1e3)
                last = now
    sync()
    return time.perf_counter() - began


def decode(model, cache, token: torch.Tensor, steps: int, warmup: int = 0,
           feed: Callable[[torch.Tensor], torch.Tensor] | None = None,
           desc: str | None = None, answer: list[int] | None = None) -> tuple[list[float], torch.Tensor]:
    """`warmup` untimed steps, then `steps` timed ones, from `token` [B, 1] -> (milliseconds of each timed step, the
    last step's greedy token).

    Each step feeds the previous step's greedy token (greedy decoding), or with `feed` what it returns for that token
    (e.g. fresh ids [1, n]: a prefill forward per step); making the input is not timed. `desc` shows a progress bar;
    `answer`, when given, receives each step's greedy token of the first row (after the step's time is taken)."""
    keyword = cache_keyword(model)
    times = []
    with torch.inference_mode():
        for index in tqdm(range(warmup + steps), desc=desc, unit="step", leave=False, disable=desc is None):
            tokens = token if feed is None else feed(token)
            began = time.perf_counter()
            token = step(model, cache, tokens, keyword)
            sync()
            if index >= warmup:
                times.append((time.perf_counter() - began) * 1e3)
            if answer is not None:
                answer.append(int(token[0, 0]))
    return times, token


# the CUDA runtime / driver calls by which the host starts work on the GPU
_HOST_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")


def launches(model, cache, tokens: torch.Tensor, by_name: bool = False, steps: int = 1) -> dict:
    """GPU kernels and copies (memcpy / memset) that `steps` more greedy steps from `tokens` launch, per step, from the
    CUDA profiler: {kernels, copies, host_launches, graph_launches}; host_launches counts the calls by which the host
    started them (a replayed CUDA graph runs its kernels from one call, graph_launches of those). With `by_name` also
    the GPU's busy time in them per step (the sum of their durations, gpu_busy_ms) and the count of each kernel name
    over the steps (by_name, most launched first). Several steps average over steps that differ (a decode that replays a graph between eager
    steps)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        for _ in range(steps):
            token = step(model, cache, tokens)
            tokens = token if tokens.shape[1] == 1 else tokens  # decode feeds its token back, a chunk is fed again
        sync()
    from kvtier.attention import PHASES

    # the scope attention's labelled steps also show on the GPU's timeline as ranges, not kernels
    events = [event for event in prof.events() if event.device_type == DeviceType.CUDA and event.name not in PHASES]
    calls = [event.name for event in prof.events() if event.device_type == DeviceType.CPU
             and event.name.startswith(_HOST_LAUNCHES)]
    copies = sum(event.name.startswith(("Memcpy", "Memset")) for event in events)
    counted = {"kernels": round((len(events) - copies) / steps, 1), "copies": round(copies / steps, 1),
               "host_launches": round(len(calls) / steps, 1),
               "graph_launches": round(sum(name.startswith("cudaGraphLaunch") for name in calls) / steps, 2)}
    if by_name:
        names: dict[str, int] = {}
        for event in events:
            names[event.name[:80]] = names.get(event.name[:80], 0) + 1
        busy_ms = sum(event.time_range.elapsed_us() for event in events) / 1e3 / steps
        counted.update(gpu_busy_ms=round(busy_ms, 3), by_name=dict(sorted(names.items(), key=lambda item: -item[1])),
                       phases=phase_times(prof, steps))
    return counted


def phase_times(prof, steps: int) -> dict[str, dict[str, float]]:
    """The scope attention's labelled steps (kvtier.attention.PHASES) under `prof`, per step: how many ranges (one
    per query chunk and layer, or per layer where a forward's chunks go at once), the host's time in them and the
    span of the GPU's timeline they cover (the first to the last of their kernels, idle gaps included: a step bound
    by the host shows about its host time there too), ms."""
    from kvtier.attention import PHASES

    times = {name: {"ranges": 0, "host_ms": 0.0, "device_ms": 0.0} for name in PHASES}
    for event in prof.events():
        if event.name in times:
            spent = times[event.name]
            on_device = event.device_type == DeviceType.CUDA
            spent["ranges"] += 0 if on_device else 1
            spent["device_ms" if on_device else "host_ms"] += event.time_range.elapsed_us() / 1e3
    return {name: {"ranges": spent["ranges"] / steps, "host_ms": round(spent["host_ms"] / steps, 3),
                   "device_ms": round(spent["device_ms"] / steps, 3)}
            for name, spent in times.items() if spent["ranges"]}
