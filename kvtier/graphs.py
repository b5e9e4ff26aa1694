"""Graph-captured decode (ReAttentionConfig.decode_graphs): a decode step whose every layer can take the static path
(kvtier.fast_decode) runs the decoder's forward as one CUDA graph, replayed: one launch from the host instead of a few
hundred kernels, which is what bounds a small model's step and most of a large one's.

Per cache: the first such step runs the static path eagerly (it warms its kernels up), the next one captures the
decoder's forward into a graph and replays it, every later one copies its token into the graph's input and replays.
Before each of them the host writes where every layer's token goes (Counters) and afterwards it advances its own
account of the layers (tokens held, the local window, the policy's step count) as the step did on the device. Any
other step (a prefill, a seal, a re-selection, a policy that selects at every step, a padded batch or beams) runs
eagerly, and an eager decode step keeps the scope the next static step builds on. The graph's buffers (the local
windows, the kept scopes, the policy's query windows, the counters) keep their addresses for the cache's life; a
change of rows or a reset drops the graph, and the next static step captures a new one.

Without capture (`capture=False`, what the CPU tests use) the static path runs eagerly at every such step: the same
arithmetic the graph replays."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import numpy as np
import torch

from kvtier.fast_decode import Counters

# decoder forward arguments a static step may carry; any other must be None or False
_STEP_ARGUMENTS = {"input_ids", "attention_mask", "position_ids", "cache_position", "past_key_values", "cache",
                   "use_cache", "inputs_embeds"}


class DecodeGraphs:
    """The static decode path of one ReAttentionCache (an unpadded batch), captured in a CUDA graph when `capture`."""

    def __init__(self, cache, capture: bool):
        self.cache = cache
        self.capture = capture
        self.active = False  # inside a static forward: the cache's attention takes each layer's static path
        self.counters: Counters | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.input_ids: torch.Tensor | None = None  # [B, 1] the graph's input
        self.output = None  # the decoder's output the graph writes
        self.warm = False  # a static step has run eagerly since the last capture was dropped
        self.steps = {"static": 0, "replayed": 0, "captures": 0}
        self.graph_bytes = 0  # GPU memory the last capture reserved for the graph's own tensors

    def drop(self) -> None:
        """Forget the captured graph (its buffers changed address: rows were changed, the cache reset)."""
        self.graph, self.input_ids, self.output, self.warm = None, None, None, False

    def ready(self, kwargs: dict[str, Any]) -> bool:
        """Whether this decoder forward is a decode step every layer can take statically."""
        ids = kwargs.get("input_ids")
        if ids is None or ids.dim() != 2 or ids.shape[1] != 1 or not self.cache.fast_decode_ready():
            return False
        return all(name in _STEP_ARGUMENTS or value is None or value is False for name, value in kwargs.items())

    def run(self, forward: Callable, kwargs: dict[str, Any]):
        """The static decode step: eagerly (warm-up, or without capture), captured, or replayed -> the decoder's
        output."""
        layers = self.cache.layers
        if self.counters is None:
            self.counters = Counters(len(layers), kwargs["input_ids"].device)
        self.counters.set(np.array([layer.fast_slots() for layer in layers], dtype=np.int64))
        self.steps["static"] += 1
        if self.capture and self.warm and self.graph is None:
            self._capture(forward, kwargs)
        if self.graph is None:
            output = self._static_forward(forward, kwargs)
            self.warm = True
        else:
            self.input_ids.copy_(kwargs["input_ids"])
            for layer in layers:
                layer.seen += 1  # what the step's update calls would count
            self.graph.replay()
            self.steps["replayed"] += 1
            output = copy.copy(self.output)
            output["last_hidden_state"] = self.output.last_hidden_state.clone()
        for layer in layers:
            layer.fast_step_done()
        return output

    def _static_forward(self, forward: Callable, kwargs: dict[str, Any]):
        self.active = True
        try:
            return forward(**kwargs)
        finally:
            self.active = False

    def _capture(self, forward: Callable, kwargs: dict[str, Any]) -> None:
        """Record the decoder's forward of a static step into a graph; the host state it advanced while recording is
        put back, as nothing ran on the device."""
        layers = self.cache.layers
        seen = [layer.seen for layer in layers]
        self.input_ids = kwargs["input_ids"].clone()
        step = {name: value for name, value in kwargs.items() if name not in ("attention_mask", "position_ids",
                                                                             "cache_position")}
        step["input_ids"] = self.input_ids
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.input_ids.device)
        torch.cuda.empty_cache()  # as entering torch.cuda.graph does: measured before that, graph_bytes went negative
        reserved = torch.cuda.memory_reserved(self.input_ids.device)
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may run forwards
                self.output = self._static_forward(forward, step)
        except RuntimeError as error:
            warnings.warn(f"kvtier: capturing the decode step in a CUDA graph failed ({error}); this cache decodes "
                          "without graphs from now on (decode_graphs='off' skips the attempt)", RuntimeWarning,
                          stacklevel=4)
            self.capture, self.output = False, None
            return
        finally:
            for layer, count in zip(layers, seen):
                layer.seen = count
                layer.discard_pending()
        self.graph = graph
        self.graph_bytes = torch.cuda.memory_reserved(self.input_ids.device) - reserved
        self.steps["captures"] += 1

    def stats(self) -> dict[str, Any]:
        """Decode steps taken statically (all of them), replayed from a graph, graphs captured; the GPU bytes the
        static path keeps: the layers' kept scopes and the last graph's own memory."""
        kept = sum(layer.fast.keys.nbytes * 2 for layer in self.cache.layers if getattr(layer, "fast", None))
        return {**self.steps, "kept_scope_bytes": kept, "graph_bytes": self.graph_bytes}
