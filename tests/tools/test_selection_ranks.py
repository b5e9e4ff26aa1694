"""benchmarks/selection_ranks.py: its --quick run writes every variant's needle ranks and the plot, and its span scores
are the attention masses a float64 loop computes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def script():
    """benchmarks/selection_ranks.py imported as a module (benchmarks/ is not a package)."""
    path = ROOT / "benchmarks" / "selection_ranks.py"
    spec = importlib.util.spec_from_file_location("benchmark_selection_ranks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # in this process, which has imported torch already
    return module


def test_quick_writes_every_variant_with_ranks_among_the_spans(script, tmp_path, capsys):
    assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("|")  # the table, last
    result = json.loads((tmp_path / "selection_ranks.json").read_text())
    assert (tmp_path / "selection_ranks.png").read_bytes()[:8] == PNG_MAGIC
    assert set(result["variants"]) == {f"{centring} {kind}" for centring in ("centred", "plain")
                                       for kind in ("tok", "tokmax", "quest", "mean")}
    spans = [prompt["spans"] for prompt in result["prompts"] if prompt["scored"]]
    layers = result["layers"]
    assert spans and result["command"][-3:] == ["--quick", "--out", str(tmp_path)] and "torch" in result["versions"]

    def ranks_among(ranks, count):
        return all(isinstance(rank, int) and 0 <= rank < count for rank in ranks)

    for variant in result["variants"].values():
        assert len(variant["layer_ranks"]) == len(variant["consensus_ranks"]) == len(spans)
        for count, per_layer, consensus in zip(spans, variant["layer_ranks"], variant["consensus_ranks"]):
            assert len(per_layer) == len(consensus) == layers
            assert ranks_among(per_layer, count) and ranks_among(consensus, count)
        assert all(ranks_among([rank], count) for count, rank in zip(spans, variant["all_layers_ranks"]))
        assert variant["all_layers_ranks"] == [consensus[-1] for consensus in variant["consensus_ranks"]]
        worst = variant["consensus_worst_ranks"]
        assert len(worst) == layers and ranks_among(worst, max(spans))
        assert set(variant["share_below"]) == {"8", "16", "63"}
        assert all(0 <= share <= 1 for share in variant["share_below"].values())


def _loop_scores(queries: torch.Tensor, middle: torch.Tensor, span: int, kind: str, centred: bool) -> torch.Tensor:
    """span_scores one query, head and span at a time, in float64."""
    queries, middle = queries.double(), middle.double()
    q_heads, count, dim = queries.shape
    kv_heads = middle.shape[0]
    if centred:
        queries = queries - sum(queries[:, index] for index in range(count))[:, None] / count
    spans = middle.shape[1] // span
    mass = torch.zeros(spans, dtype=torch.float64)
    for head in range(q_heads):
        keys = middle[head // (q_heads // kv_heads)]  # [n*S, D]
        for query in queries[head]:
            if kind == "tok":
                weights = torch.tensor([float(query @ key) for key in keys], dtype=torch.float64) / dim**0.5
                weights = weights.exp() / weights.exp().sum()
                mass += torch.stack([weights[index * span : (index + 1) * span].sum() for index in range(spans)])
                continue
            logits = []
            for index in range(spans):
                block = keys[index * span : (index + 1) * span]  # [S, D]
                if kind == "tokmax":
                    logits.append(max(float(query @ key) for key in block))
                elif kind == "quest":
                    logits.append(sum(float(q) * float(block[:, channel].max() if q > 0 else block[:, channel].min())
                                      for channel, q in enumerate(query)))
                else:
                    logits.append(float(query @ block.mean(0)))
            weights = torch.tensor(logits, dtype=torch.float64) / dim**0.5
            mass += weights.exp() / weights.exp().sum()
    return mass


@pytest.mark.parametrize("kind", ["tok", "tokmax", "quest", "mean"])
@pytest.mark.parametrize("centred", [True, False])
def test_span_scores_are_the_attention_mass_a_float64_loop_computes(script, kind, centred):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(6, 5, 8, generator=generator)  # [Hq, q, D]: 3 query heads per KV head
    middle = torch.randn(2, 7 * 4, 8, generator=generator).half()  # [Hkv, n*S, D]: 7 spans of 4, stored as captured
    scores = script.span_scores(queries, middle, 4, kind, centred)
    assert scores.dtype == torch.float32 and scores.shape == (7,)
    torch.testing.assert_close(scores.double(), _loop_scores(queries, middle, 4, kind, centred), rtol=1e-5, atol=1e-5)
    assert float(scores.sum()) == pytest.approx(6 * 5, rel=1e-5)  # each (head, query) spreads one unit of mass


def test_the_needle_rank_counts_the_spans_above_its_best_span(script):
    scores = torch.tensor([0.5, 3.0, 1.0, 2.0, 1.0, 4.0])
    assert script.needle_rank(scores, range(2, 4)) == 2  # span 3 (2.0) is its best: spans 5 and 1 score higher
    assert script.needle_rank(scores, range(5, 6)) == 0
    assert script.needle_rank(scores, range(4, 5)) == 3  # a tie with span 2 does not count against it
