"""Kernel declarations: a policy's Triton kernels (kernel_summary, kernel_scoring, kernel_span_scores) stand in for
the methods they replace only in the class that declares them; a subclass that overrides those methods runs its own
code on the kernel path (kvtier.dispatch), one that only changes parameters or declares the kernel itself keeps the
kernel. On a CPU-only machine the kernels run in Triton's interpreter (tests/conftest.py)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton", reason="the kernel path needs the triton package (the triton extra, which scripts/setup.sh installs)")

from kvtier import ReAttentionConfig, dispatch  # noqa: E402
from kvtier.kernels import select as select_module  # noqa: E402
from kvtier.kernels import summarise as summarise_module  # noqa: E402
from kvtier.kernels import window_mass as window_mass_module  # noqa: E402
from kvtier.policies import (  # noqa: E402
    ConsensusPolicy, InfLLMPolicy, MeanPolicy, Policy, QuestPolicy, ReAttentionPolicy,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONFIG = ReAttentionConfig(global_size=4, local_size=64, span_size=8, top_k=3, chunk_size=8, kernels="triton")
SUMMARY_KERNELS = [QuestPolicy, MeanPolicy, InfLLMPolicy]
SCORING_KERNELS = [QuestPolicy, MeanPolicy, InfLLMPolicy, ReAttentionPolicy]
REPLACED = {  # the methods each declaration's kernel computes in their place
    "kernel_summary": ("summarise", "summary_size"),
    "kernel_scoring": ("candidate_scores", "aggregate", "select"),
    "kernel_span_scores": ("span_best_scores",),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def config() -> ReAttentionConfig:
    config = CONFIG.resolve(4096)
    assert dispatch.kernels_enabled(config, DEVICE)
    return config


@pytest.fixture
def kernel_calls(monkeypatch) -> dict[str, list]:
    """The kernel launchers dispatch calls, each with the (args, kwargs) of every call."""
    calls: dict[str, list] = {"summarise_spans": [], "select_spans": [], "span_best_scores": []}
    launchers = ((summarise_module, "summarise_spans"), (select_module, "select_spans"),
                 (window_mass_module, "span_best_scores"))
    for module, name in launchers:
        def spy(*args, _launch=getattr(module, name), _name=name, **kwargs):
            calls[_name].append((args, kwargs))
            return _launch(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def _subclass(parent: type[Policy], **body) -> type[Policy]:
    """A @dataclass subclass of `parent` whose own body defines `body`."""
    return dataclass(type(f"Custom{parent.__name__}", (parent,), body))


def _keys(n_spans=6, kv_heads=2, span=8, dim=16, seed=0) -> torch.Tensor:
    """Random pre-RoPE keys [N, Hkv, S, D] of sealed spans."""
    return torch.randn(n_spans, kv_heads, span, dim, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _selection_inputs(policy: Policy, n_spans=10, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random queries [1, Hq=4, q=3, D] and the policy's summaries [1, Hkv=2, n, c, D] of random keys."""
    queries = torch.randn(1, 4, 3, 16, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return queries, policy.summarise(_keys(n_spans, seed=seed + 1)).unsqueeze(0).transpose(1, 2)


# ---- which declarations a subclass keeps ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "parent, declaration", [(cls, name) for cls in SCORING_KERNELS for name in REPLACED if getattr(cls, name)],
    ids=lambda value: getattr(value, "name", value),
)
def test_overriding_a_replaced_method_drops_only_that_kernel(parent, declaration):
    other = next(name for name in REPLACED if name != declaration)
    for method in REPLACED[declaration]:
        custom = _subclass(parent, **{method: getattr(parent, method)})
        assert getattr(custom, declaration) is None, method
        assert getattr(custom, other) == getattr(parent, other), method


@pytest.mark.parametrize("parent", SCORING_KERNELS, ids=lambda cls: cls.name)
def test_a_subclass_changing_only_parameters_keeps_the_kernels(parent):
    custom = _subclass(parent, __annotations__={"aggregation": str, "votes": int}, aggregation="sum", votes=2)
    assert (custom.kernel_summary, custom.kernel_scoring) == (parent.kernel_summary, parent.kernel_scoring)
    assert (custom().aggregation, custom().votes) == ("sum", 2)


def test_a_method_from_a_mixin_before_the_declaring_class_drops_its_kernel():
    class OwnSummary:
        def summarise(self, keys: torch.Tensor) -> torch.Tensor:
            return keys.float().mean(dim=2, keepdim=True).to(keys.dtype)

    @dataclass
    class Mixed(OwnSummary, MeanPolicy):
        pass

    assert (Mixed.kernel_summary, Mixed.kernel_scoring) == (None, "dot")


def test_a_subclass_of_an_overriding_subclass_stays_on_its_methods():
    custom = _subclass(QuestPolicy, summarise=QuestPolicy.summarise)
    assert _subclass(custom).kernel_summary is None


# ---- what runs on the kernel path -----------------------------------------------------------------------------
@pytest.mark.parametrize("parent", SUMMARY_KERNELS, ids=lambda cls: cls.name)
def test_an_overridden_summarise_runs_on_the_kernel_path(parent, kernel_calls, config):
    def summarise(self, keys: torch.Tensor) -> torch.Tensor:
        return keys.new_full((*keys.shape[:2], self.summary_size(keys.shape[2]), keys.shape[3]), 7.0)

    policy = _subclass(parent, summarise=summarise)()
    keys = _keys()
    summaries = dispatch.summarise(policy, keys, use_kernels=True)
    assert torch.equal(summaries, torch.full_like(parent().summarise(keys), 7.0))
    assert not kernel_calls["summarise_spans"]


@pytest.mark.parametrize("parent", SCORING_KERNELS, ids=lambda cls: cls.name)
def test_overridden_candidate_scores_run_on_the_kernel_path(parent, kernel_calls, config):
    def candidate_scores(self, queries: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        """Each candidate scores its span's id: the last spans win under every aggregation."""
        scores = parent.candidate_scores(self, queries, summaries)  # [B, Hkv, g, q, n, m]
        return torch.arange(scores.shape[-2], dtype=scores.dtype, device=scores.device)[:, None].expand_as(scores)

    policy = _subclass(parent, candidate_scores=candidate_scores)()
    queries, summaries = _selection_inputs(policy)
    last = torch.arange(7, 10, device=DEVICE).view(1, 1, 3)
    ids = dispatch.select(policy, queries, summaries, config, use_kernels=True)
    assert torch.equal(ids, last)
    assert not kernel_calls["select_spans"]
    assert not torch.equal(dispatch.select(parent(), queries, summaries, config, use_kernels=True), last)


def test_a_subclass_with_a_new_parameter_value_runs_the_kernels_with_it(kernel_calls, config):
    @dataclass
    class WiderInfLLM(InfLLMPolicy):
        aggregation: str = "vote"
        representatives: int = 6

    policy = WiderInfLLM()
    summaries = dispatch.summarise(policy, _keys(), use_kernels=True)
    assert summaries.shape == (6, 2, 6, 16)
    assert kernel_calls["summarise_spans"][0][1] == {"representatives": 6}
    queries, table = _selection_inputs(policy)
    ids = dispatch.select(policy, queries, table, config, use_kernels=True)
    assert torch.equal(ids, policy.select(queries, table, config.top_k, config.per_kv_head))
    [(call_args, _)] = kernel_calls["select_spans"]
    assert call_args[2:4] == ("dot", "vote")


def test_a_subclass_declaring_the_kernel_for_its_own_method_keeps_it(kernel_calls, config):
    @dataclass
    class StackedQuest(QuestPolicy):
        kernel_summary = "minmax"  # its summarise computes what the minmax kernel does

        def summarise(self, keys: torch.Tensor) -> torch.Tensor:
            return torch.stack(keys.aminmax(dim=2), dim=2)

    keys = _keys()
    assert torch.equal(dispatch.summarise(StackedQuest(), keys, use_kernels=True), StackedQuest().summarise(keys))
    assert len(kernel_calls["summarise_spans"]) == 1


# ---- consensus: only its span scores have a kernel ------------------------------------------------------------
def test_consensus_declares_only_its_span_scores_kernel():
    assert (ConsensusPolicy.kernel_summary, ConsensusPolicy.kernel_scoring) == (None, None)
    assert ConsensusPolicy.kernel_span_scores == "dot"
    assert _subclass(ConsensusPolicy, span_best_scores=ConsensusPolicy.span_best_scores).kernel_span_scores is None
    wider = _subclass(ConsensusPolicy, __annotations__={"window": int}, window=8)
    assert wider.kernel_span_scores == "dot" and wider().window == 8


def test_consensus_calls_the_span_scores_kernel_on_the_kernel_path_only(kernel_calls, config):
    policy = ConsensusPolicy()
    queries, keys = _selection_inputs(policy)
    on_kernels = dispatch.select(policy, queries, keys, config, use_kernels=True)
    assert len(kernel_calls["span_best_scores"]) == 1 and policy.span_scores_kernel is not None
    on_reference = dispatch.select(ConsensusPolicy(), queries, keys, config, use_kernels=False)
    assert len(kernel_calls["span_best_scores"]) == 1
    assert torch.equal(on_kernels, on_reference)
    dispatch.select(policy, queries, keys, config, use_kernels=False)  # a layer on another device: no kernel there
    assert policy.span_scores_kernel is None and len(kernel_calls["span_best_scores"]) == 1


def test_an_overridden_span_best_scores_runs_on_the_kernel_path(kernel_calls, config):
    def span_best_scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Every span scores its id for every query: the last spans win."""
        ids = torch.arange(keys.shape[2], dtype=torch.float32, device=keys.device)
        return ids.expand(*queries.shape[:4], -1)

    policy = _subclass(ConsensusPolicy, span_best_scores=span_best_scores)(keep_first_span=False)
    queries, keys = _selection_inputs(policy)
    ids = dispatch.select(policy, queries, keys, config, use_kernels=True)
    assert torch.equal(ids, torch.arange(7, 10, device=DEVICE).view(1, 1, 3))
    assert not kernel_calls["span_best_scores"] and policy.span_scores_kernel is None
