"""ReAttentionConfig: round trip through YAML/JSON; defaults derived from the window; every invalid configuration raises
a ValueError that names the problem and the fix."""
from __future__ import annotations

import json

import pytest

from kvtier.config import DEFAULT_POLICY, DEFAULT_SCOPE_FRACTION, ReAttentionConfig, derive_defaults
from kvtier.policies import policy_names

WINDOW = 8192


def _custom() -> ReAttentionConfig:
    return ReAttentionConfig(
        global_size=16,
        local_size=1024,
        span_size=16,
        top_k=40,
        chunk_size=256,
        policy="reattention",
        policy_options={"aggregation": "sum", "votes": 2, "query_block": 8},
        per_kv_head=True,
        allow_exceeding_window=True,
    )


# ---- round trip -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize(
    "config",
    [ReAttentionConfig(), _custom(), ReAttentionConfig(policy="mean", per_kv_head=True).resolve(WINDOW)],
    ids=["defaults", "custom", "resolved"],
)
def test_config_round_trips_through_file(tmp_path, suffix, config):
    path = tmp_path / f"kvtier{suffix}"
    config.to_file(path)
    loaded = ReAttentionConfig.from_file(path)
    assert loaded == config
    assert loaded.policy_options == config.policy_options
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file was renamed, not left behind


def test_config_round_trips_through_dict():
    config = _custom()
    assert ReAttentionConfig.from_dict(config.to_dict()) == config


def test_json_file_is_plain_json(tmp_path):
    path = tmp_path / "kvtier.json"
    _custom().to_file(path)
    assert json.loads(path.read_text())["policy_options"] == {"aggregation": "sum", "votes": 2, "query_block": 8}


def test_from_file_accepts_uppercase_suffix(tmp_path):
    path = tmp_path / "kvtier.YAML"
    path.write_text("top_k: 7\npolicy: mean\n")
    assert ReAttentionConfig.from_file(path) == ReAttentionConfig(top_k=7, policy="mean")


def test_from_file_reads_hand_written_yaml(tmp_path):
    path = tmp_path / "kvtier.yaml"
    path.write_text("policy: quest\npolicy_options:\n  aggregation: max\nper_kv_head: true\nlocal_size: 1024\n")
    config = ReAttentionConfig.from_file(path)
    assert config == ReAttentionConfig(policy="quest", policy_options={"aggregation": "max"}, per_kv_head=True, local_size=1024)


def test_to_file_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        ReAttentionConfig().to_file(tmp_path / "kvtier.toml")


# ---- reading errors -------------------------------------------------------------------------------------------------
def test_from_dict_names_unknown_field():
    with pytest.raises(ValueError, match=r"unknown kvtier config field.*'top_kk'.*valid fields"):
        ReAttentionConfig.from_dict({"top_kk": 3, "policy": "mean"})


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ValueError, match=r"must be a mapping.*list"):
        ReAttentionConfig.from_dict([("top_k", 3)])


def test_replace_names_unknown_field():
    with pytest.raises(ValueError, match=r"unknown kvtier config field.*'topk'"):
        ReAttentionConfig().replace(topk=3)


def test_replace_changes_only_the_given_fields():
    config = _custom()
    assert config.replace(top_k=3) == ReAttentionConfig(**{**config.to_dict(), "top_k": 3})


def test_from_file_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.yaml.*does not exist"):
        ReAttentionConfig.from_file(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["kvtier.toml", "kvtier.txt", "kvtier"])
def test_from_file_wrong_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text("top_k: 3\n")
    with pytest.raises(ValueError, match=r"use a \.yaml, \.yml or \.json file"):
        ReAttentionConfig.from_file(path)


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("bad.yaml", "top_k: [1, 2\n", "not valid YAML"),
        ("bad.yml", "policy: quest\n  top_k: 3\n", "not valid YAML"),
        ("bad.json", '{"top_k": }', "not valid JSON"),
        ("bad.json", "", "not valid JSON"),
        ("bad.yaml", "- top_k: 3\n- policy: mean\n", "must be a mapping.*list"),
        ("bad.yaml", "[]\n", "must be a mapping.*list"),
        ("bad.json", '[{"top_k": 3}]', "must be a mapping.*list"),
        ("bad.json", "[]", "must be a mapping.*list"),
        ("bad.yaml", "just some text\n", "must be a mapping.*str"),
        ("bad.yaml", "top_k: 3\nspan: 8\n", r"unknown kvtier config field.*'span'"),
    ],
    ids=["yaml-unclosed", "yml-bad-indent", "json-syntax", "json-empty", "yaml-list", "yaml-empty-list", "json-list",
         "json-empty-list", "yaml-scalar", "unknown-field"],
)
def test_from_file_bad_content_names_the_problem(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        ReAttentionConfig.from_file(path)


def test_empty_yaml_file_is_the_default_config(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert ReAttentionConfig.from_file(path) == ReAttentionConfig()


# ---- derived defaults -----------------------------------------------------------------------------------------------
def test_defaults_for_an_8k_window():
    config = ReAttentionConfig().resolve(WINDOW)
    scope = int(WINDOW * DEFAULT_SCOPE_FRACTION)
    assert (config.global_size, config.span_size, config.local_size, config.chunk_size) == (32, 32, scope // 2, 512)
    assert config.top_k == (scope - 32 - scope // 2) // 32
    assert config.seal_group == 4  # the local window grows by up to 3 spans between seals
    assert config.scope_bound == scope + 3 * 32 <= WINDOW
    assert config.local_limit == scope // 2 + 3 * 32
    assert config.policy == DEFAULT_POLICY
    assert (config.per_kv_head, config.allow_exceeding_window, config.policy_options) == (False, False, {})


def test_derive_defaults_matches_resolve():
    assert ReAttentionConfig().resolve(WINDOW) == ReAttentionConfig(**derive_defaults(WINDOW), seal_group=4)


def test_a_tiny_window_asks_for_explicit_sizes():
    with pytest.raises(ValueError, match="too small to derive a scope"):
        ReAttentionConfig().resolve(16)
    tiny = ReAttentionConfig(global_size=1, local_size=8, span_size=2, top_k=2, chunk_size=4).resolve(16)
    assert (tiny.seal_group, tiny.scope_bound) == (2, 15)  # "auto" seals fewer spans at once where the window is short


@pytest.mark.parametrize("window", [64, 128, 512, 2048, 4096, 8192, 32768, 131072, 1 << 20])
def test_defaults_fit_every_window(window):
    config = ReAttentionConfig().resolve(window)
    assert config.scope_bound <= window
    assert config.local_size <= 8192
    assert config.chunk_size + config.span_size <= config.local_size
    # top_k fills the scope: one more span would overflow it
    assert config.scope_bound + config.span_size > int(window * DEFAULT_SCOPE_FRACTION)


def test_resolve_keeps_user_fields_and_top_k_fills_the_rest():
    config = ReAttentionConfig(local_size=1024, span_size=16, policy="mean").resolve(WINDOW)
    scope = int(WINDOW * DEFAULT_SCOPE_FRACTION)
    assert (config.local_size, config.span_size, config.policy) == (1024, 16, "mean")
    assert config.global_size == 32
    assert config.top_k == (scope - 32 - 1024) // 16
    spans_and_windows = config.global_size + config.top_k * config.span_size + config.local_size
    assert scope - 16 < spans_and_windows <= scope


def test_resolve_keeps_user_top_k_and_chunk_size():
    config = ReAttentionConfig(top_k=5, chunk_size=100, global_size=0).resolve(WINDOW)
    assert (config.top_k, config.chunk_size, config.global_size) == (5, 100, 0)


def test_large_local_window_lets_top_k_fill_the_trained_window():
    config = ReAttentionConfig(local_size=6000).resolve(WINDOW)
    assert config.local_size == 6000
    assert WINDOW - config.span_size < config.scope_bound <= WINDOW


def test_resolve_is_idempotent():
    config = ReAttentionConfig(span_size=16).resolve(WINDOW)
    assert config.resolve(WINDOW) == config


def test_resolve_does_not_change_the_original():
    config = ReAttentionConfig()
    config.resolve(WINDOW)
    assert config.top_k is None and config.local_size is None


def test_scope_bound_needs_resolve():
    with pytest.raises(ValueError, match=r"unset.*resolve\(window\)"):
        ReAttentionConfig().scope_bound


def test_validate_needs_resolve():
    with pytest.raises(ValueError, match=r"unset.*resolve\(window\)"):
        ReAttentionConfig(top_k=3).validate(WINDOW)


@pytest.mark.parametrize("window", [0, -8, 8192.0, "8192", True, None])
def test_resolve_rejects_bad_window(window):
    with pytest.raises(ValueError, match=r"window.*positive integer"):
        ReAttentionConfig().resolve(window)


# ---- invalid configurations -----------------------------------------------------------------------------------------
def test_seal_group_auto_fits_the_window_and_an_explicit_one_is_checked():
    paper = ReAttentionConfig(global_size=32, local_size=4064, span_size=32, top_k=127, chunk_size=512)  # 8,160
    assert paper.resolve(WINDOW).seal_group == 2  # 8160 + 32 fits the 8K window, 8160 + 64 would not
    with pytest.raises(ValueError, match=r"\+ 96 = 8256 exceeds the model's 8192-token window; lower top_k to 125, "
                                         r"lower seal_group or pass allow_exceeding_window=True"):
        paper.replace(seal_group=4).resolve(WINDOW)
    assert paper.replace(seal_group=4, allow_exceeding_window=True).resolve(WINDOW).scope_bound == 8256


@pytest.mark.parametrize("value", [0, -1, 1.5, "4", True])
def test_seal_group_must_be_a_positive_integer_or_auto(value):
    with pytest.raises(ValueError, match=r"seal_group must be a positive integer \(spans sealed at once\) or 'auto'"):
        ReAttentionConfig(seal_group=value).resolve(WINDOW)


def test_scope_exceeding_the_window_names_both_fixes():
    config = ReAttentionConfig(top_k=200)
    with pytest.raises(ValueError, match=r"exceeds the model's 8192-token window; lower top_k to 191 or pass allow_exceeding_window=True"):
        config.resolve(WINDOW)


def test_allow_exceeding_window_lets_the_scope_exceed_it():
    config = ReAttentionConfig(top_k=200, allow_exceeding_window=True).resolve(WINDOW)
    assert config.scope_bound > WINDOW


def test_suggested_top_k_fits_the_window():
    resolved = ReAttentionConfig(top_k=191).resolve(WINDOW)
    assert resolved.scope_bound <= WINDOW


def test_scope_exceeding_the_window_without_any_spans_names_local_size():
    """global + local alone exceed the window: lowering top_k cannot help, so the message must name local_size."""
    with pytest.raises(ValueError, match=r"exceeds the model's 8192-token window.*local_size"):
        ReAttentionConfig(local_size=10000).resolve(WINDOW)


@pytest.mark.parametrize("value", [0, -1, -32])
def test_span_size_must_be_positive(value):
    with pytest.raises(ValueError, match=rf"span_size must be positive, got {value}"):
        ReAttentionConfig(span_size=value).resolve(WINDOW)


@pytest.mark.parametrize("value", [0, -32])
def test_span_size_must_be_positive_when_everything_is_given(value):
    config = ReAttentionConfig(global_size=32, local_size=2048, span_size=value, top_k=4, chunk_size=512)
    with pytest.raises(ValueError, match=rf"span_size must be positive, got {value}"):
        config.resolve(WINDOW)


@pytest.mark.parametrize("field", ["local_size", "chunk_size"])
def test_local_and_chunk_size_must_be_positive(field):
    with pytest.raises(ValueError, match=rf"{field} must be positive, got 0; try the default by leaving it out"):
        ReAttentionConfig(**{field: 0}).resolve(WINDOW)


def test_chunk_must_fit_in_the_local_window_with_a_span_to_spare():
    config = ReAttentionConfig(local_size=512, chunk_size=512, span_size=32)
    with pytest.raises(ValueError, match=r"chunk_size \+ span_size = 512 \+ 32 exceeds local_size = 512.*lower chunk_size to 480 or raise local_size"):
        config.resolve(WINDOW)


def test_suggested_chunk_size_fits():
    assert ReAttentionConfig(local_size=512, chunk_size=480, span_size=32).resolve(WINDOW).chunk_size == 480


@pytest.mark.parametrize("field", ["global_size", "top_k"])
def test_global_size_and_top_k_must_not_be_negative(field):
    with pytest.raises(ValueError, match=rf"{field} must be >= 0, got -1"):
        ReAttentionConfig(**{field: -1}).resolve(WINDOW)


def test_zero_global_size_and_zero_top_k_are_valid():
    config = ReAttentionConfig(global_size=0, top_k=0).resolve(WINDOW)
    assert config.scope_bound == config.local_limit


@pytest.mark.parametrize("field", ["global_size", "local_size", "span_size", "top_k", "chunk_size"])
@pytest.mark.parametrize("value", [16.0, 2.5, "16", True, False], ids=["float", "fraction", "string", "true", "false"])
def test_sizes_must_be_integers(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be an integer, got {value!r}"):
        ReAttentionConfig(**{field: value}).resolve(WINDOW)


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown policy 'bogus'.*" + ".*".join(policy_names())):
        ReAttentionConfig(policy="bogus").resolve(WINDOW)


def test_unknown_policy_option_lists_the_parameters():
    with pytest.raises(ValueError, match=r"policy 'quest' has no parameter\(s\) \['window'\].*aggregation"):
        ReAttentionConfig(policy="quest", policy_options={"window": 3}).resolve(WINDOW)


@pytest.mark.parametrize("policy", [name for name in policy_names() if name != "streaming"])
def test_bad_aggregation_lists_the_valid_ones(policy):
    config = ReAttentionConfig(policy=policy, policy_options={"aggregation": "mean"})
    with pytest.raises(ValueError, match=r"aggregation must be one of \('vote', 'max', 'sum'\), got 'mean'"):
        config.resolve(WINDOW)


@pytest.mark.parametrize("options, problem", [({"votes": 0}, "votes must be a positive integer"),
                                              ({"query_block": 0}, "query_block must be a positive integer")])
def test_bad_policy_parameters(options, problem):
    with pytest.raises(ValueError, match=problem):
        ReAttentionConfig(policy="reattention", policy_options=options).resolve(WINDOW)


@pytest.mark.parametrize("field", ["per_kv_head", "allow_exceeding_window"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_flags_must_be_booleans(field, value):
    with pytest.raises(ValueError, match=r"per_kv_head and allow_exceeding_window must be true or false"):
        ReAttentionConfig(**{field: value}).resolve(WINDOW)


def test_policy_options_must_be_a_mapping():
    with pytest.raises(ValueError, match=r"policy_options must be a mapping, got list"):
        ReAttentionConfig(policy_options=["vote"]).resolve(WINDOW)


@pytest.mark.parametrize("policy", policy_names())
def test_every_registered_policy_is_a_valid_config(policy):
    assert ReAttentionConfig(policy=policy).resolve(WINDOW).policy == policy
