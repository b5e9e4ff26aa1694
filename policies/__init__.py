"""Selection policies, chosen by name in ReAttentionConfig.policy; `register_policy` adds your own, which can build
on the helpers every policy uses: `dot_scores` (a candidate_scores), `rank_spans` and `best_spans` (the selection
order and the top k in it)."""
from __future__ import annotations

import dataclasses
from typing import Any

from .base import AGGREGATIONS, LAYOUTS, Policy, best_run_last, best_spans, dot_scores, rank_spans
from .consensus import ConsensusPolicy
from .infllm import InfLLMPolicy
from .mean import MeanPolicy
from .quest import QuestPolicy
from .reattention import ReAttentionPolicy
from .streaming import StreamingPolicy

_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Register a Policy subclass under its `name` (usable as a class decorator); a name can be taken once."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)) or not dataclasses.is_dataclass(cls):
        raise TypeError(f"register_policy expects a @dataclass subclass of kvtier.policies.Policy, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"a policy named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def build_policy(name: str, options: dict[str, Any] | None = None) -> Policy:
    """The policy `name` with its parameters from `options`; unknown names or parameters raise ValueError."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; choose one of {policy_names()} or register yours with register_policy")
    cls = _REGISTRY[name]
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"policy {name!r} has no parameter(s) {unknown}; its parameters are {sorted(fields)}")
    return cls(**options)


for _cls in (ReAttentionPolicy, MeanPolicy, QuestPolicy, InfLLMPolicy, StreamingPolicy, ConsensusPolicy):
    register_policy(_cls)

__all__ = [
    "AGGREGATIONS", "LAYOUTS", "Policy", "best_run_last", "best_spans", "build_policy", "dot_scores", "policy_names",
    "rank_spans", "register_policy",
] + [
    c.__name__ for c in (ReAttentionPolicy, MeanPolicy, QuestPolicy, InfLLMPolicy, StreamingPolicy, ConsensusPolicy)
]
