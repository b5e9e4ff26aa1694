"""ReAttentionConfig: the scope's sizes, the selection policy, derivation from a model's window, validation."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Chosen by measurement on SmolLM2-135M-Instruct with `kvtier niah` (README, "Why these defaults").
DEFAULT_POLICY = "consensus"
# The scope fills this fraction of the trained window: SmolLM2 retrieves better with half its window than with all
# of it (its own recall fades near the end of its window), measured in benchmarks/RESULTS.md.
DEFAULT_SCOPE_FRACTION = 0.5
_PAPER_GLOBAL = 32
_PAPER_SPAN = 32
_PAPER_CHUNK = 512
_MAX_LOCAL = 8192
# spans sealed at once by default: a graph-replayed decode runs one eager step per SEAL_GROUP * span_size tokens
SEAL_GROUP = 4

_SIZE_FIELDS = ("global_size", "local_size", "span_size", "top_k", "chunk_size")
PLACEMENT_FIELDS = ("gpu_budget", "host_budget", "disk_path", "disk_budget")
KERNEL_CHOICES = ("auto", "reference", "triton")
ATTENTION_BACKENDS = ("auto", "flash", "sdpa")
DECODE_GRAPHS = ("auto", "off")
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class ReAttentionConfig:
    """What each attention call sees: `[global | top_k spans of span_size | local window]`, queries in chunks.

    A field left at None is derived from the model's trained window by `resolve` (see `derive_defaults`).
    """

    global_size: int | None = None
    local_size: int | None = None
    span_size: int | None = None
    top_k: int | None = None
    chunk_size: int | None = None
    policy: str = DEFAULT_POLICY
    policy_options: dict[str, Any] = field(default_factory=dict)
    per_kv_head: bool = False
    allow_exceeding_window: bool = False
    # where sealed spans live (None = no limit / no disk tier); budgets in bytes or strings like "8GiB"
    # gpu_budget may also be a mapping of device -> budget ({"cuda:0": "20GiB", "cuda:1": "30GiB"}) for a model whose
    # layers device_map spread over several GPUs; a single budget is split by each device's share of the layers
    gpu_budget: int | str | dict[str, int | str] | None = None
    host_budget: int | str | None = None
    disk_path: str | None = None
    disk_budget: int | str | None = None
    # "auto": Triton kernels on CUDA, PyTorch references elsewhere; "reference" / "triton": always that one ("triton"
    # on a CPU needs TRITON_INTERPRET=1, slow: for tests)
    kernels: str = "auto"
    # the scope attention's kernel (kvtier.flash): "auto": FlashAttention for query chunks where it is installed and
    # runs (CUDA, fp16 / bf16, its head sizes), SDPA for decode steps and elsewhere; "flash": FlashAttention for every
    # call or a ValueError naming the fix; "sdpa": SDPA
    attention_backend: str = "auto"
    # decode steps that only add their own token to the scope (a policy that reuses its selection, e.g. consensus
    # between re-scorings) run statically and are replayed from a CUDA graph (kvtier.graphs): "auto" on CUDA for an
    # unpadded batch, the eager path elsewhere; "off": always the eager path
    decode_graphs: str = "auto"
    # the local window seals its oldest tokens seal_group spans at a time (kvtier.regions.spans_to_seal): it grows up
    # to (seal_group - 1) * span_size tokens past local_size, then seals back to at most local_size, so a decode of
    # static steps (decode_graphs) takes one eager step (the seal, and consensus' re-scoring) per seal_group *
    # span_size tokens. 1 seals each span as it fills (the paper's); "auto": SEAL_GROUP, fewer where the scope would
    # exceed the model's window
    seal_group: int | str = "auto"

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReAttentionConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a kvtier config must be a mapping of field -> value, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown kvtier config field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "ReAttentionConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"kvtier config file {str(path)!r} does not exist")
        text = path.read_text()
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"kvtier config file {str(path)!r} is not valid YAML: {err}") from None
        elif suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"kvtier config file {str(path)!r} is not valid JSON: {err}") from None
        else:
            raise ValueError(f"kvtier config file {str(path)!r}: use a .yaml, .yml or .json file")
        return cls.from_dict({} if data is None else data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_file(self, path: str | Path) -> None:
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        elif suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        else:
            raise ValueError(f"cannot write kvtier config to {str(path)!r}: use a .yaml, .yml or .json file")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def replace(self, **changes: Any) -> "ReAttentionConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown kvtier config field(s) {unknown}; valid fields are {sorted(known)}")
        return dataclasses.replace(self, **changes)

    # ---- derived quantities -------------------------------------------------------------------------------------
    @property
    def local_limit(self) -> int:
        """Most tokens the local window holds when a query attends: local_size + (seal_group - 1) * span_size."""
        self._require_resolved()
        return self.local_size + (self.seal_group - 1) * self.span_size

    @property
    def scope_bound(self) -> int:
        """Largest scope an attention call can see; every rotary position used is below it."""
        local_limit = self.local_limit  # checks that the config is resolved
        return self.global_size + self.top_k * self.span_size + local_limit

    def resolve(self, window: int) -> "ReAttentionConfig":
        """Fill the fields left at None (and seal_group "auto") from `window` (the model's trained context), then
        validate."""
        given = {name: getattr(self, name) for name in _SIZE_FIELDS if getattr(self, name) is not None}
        resolved = dataclasses.replace(self, **derive_defaults(window, **given))
        if resolved.seal_group == "auto":
            resolved = dataclasses.replace(resolved, seal_group=fitting_seal_group(resolved, window))
        resolved.validate(window)
        return resolved

    def validate(self, window: int) -> None:
        for name in _SIZE_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if name in ("span_size", "local_size", "chunk_size") and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}; try the default by leaving it out")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if isinstance(self.seal_group, bool) or not (isinstance(self.seal_group, int) and self.seal_group >= 1
                                                     or self.seal_group == "auto"):
            raise ValueError(f"seal_group must be a positive integer (spans sealed at once) or 'auto', got "
                             f"{self.seal_group!r}")
        self._require_resolved()
        if self.chunk_size + self.span_size > self.local_size:
            raise ValueError(
                f"chunk_size + span_size = {self.chunk_size} + {self.span_size} exceeds local_size = {self.local_size}: "
                f"a query chunk must fit in the local window with a span to spare; lower chunk_size to "
                f"{max(self.local_size - self.span_size, 1)} or raise local_size"
            )
        if self.scope_bound > window and not self.allow_exceeding_window:
            slack = (self.seal_group - 1) * self.span_size
            fit_k = (window - self.global_size - self.local_limit) // self.span_size
            fix = (
                f"lower top_k to {fit_k}"
                if fit_k >= 0
                else f"lower local_size to at most {window - self.global_size - self.top_k * self.span_size - slack}"
            )
            fix += ", lower seal_group" if self.seal_group > 1 else ""
            raise ValueError(
                f"global_size + top_k * span_size + local_size + (seal_group - 1) * span_size = {self.global_size} + "
                f"{self.top_k}*{self.span_size} + {self.local_size} + {slack} = {self.scope_bound} exceeds the model's "
                f"{window}-token window; {fix} or pass allow_exceeding_window=True"
            )
        if not isinstance(self.per_kv_head, bool) or not isinstance(self.allow_exceeding_window, bool):
            raise ValueError("per_kv_head and allow_exceeding_window must be true or false")
        if not isinstance(self.policy_options, dict):
            raise ValueError(f"policy_options must be a mapping, got {type(self.policy_options).__name__}")
        from kvtier.policies import build_policy

        build_policy(self.policy, self.policy_options)
        self._validate_placement()
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.decode_graphs not in DECODE_GRAPHS:
            raise ValueError(f"decode_graphs must be one of {DECODE_GRAPHS}, got {self.decode_graphs!r}")

    def budget_bytes(self, name: str) -> int | None:
        """gpu_budget / host_budget / disk_budget in bytes (None: unlimited); a gpu_budget given per device is read
        with device_budgets instead."""
        value = getattr(self, name)
        if isinstance(value, dict):
            raise ValueError(f"{name} is given per device ({sorted(value)}): read it with device_budgets()")
        return parse_bytes(value, name)

    def device_budgets(self) -> dict[str, int] | None:
        """A gpu_budget given per device -> {"cuda:0": bytes, ...} (device names as torch writes them); None when it is a
        single budget or unset. ValueError naming the entry for a name that is no device or a size that is none."""
        if not isinstance(self.gpu_budget, dict):
            return None
        budgets = {}
        for name, value in self.gpu_budget.items():
            try:
                device = torch.device(name)
            except (RuntimeError, TypeError):
                device = None
            if device is None or device.index is None:
                raise ValueError(f"gpu_budget names {name!r}, which is no device with an index: write the devices as "
                                 f"'cuda:0', 'cuda:1', ...")
            budgets[str(device)] = parse_bytes(value, f"gpu_budget[{name!r}]")
        return budgets

    def _validate_placement(self) -> None:
        self.device_budgets()
        for name in ("gpu_budget", "host_budget", "disk_budget"):
            if not isinstance(getattr(self, name), dict):
                self.budget_bytes(name)
        if self.disk_path is not None and (not isinstance(self.disk_path, str) or not self.disk_path):
            raise ValueError(f"disk_path must be a directory path (a string), got {self.disk_path!r}")
        if self.disk_budget is not None and self.disk_path is None:
            raise ValueError("disk_budget is set but disk_path is not: set disk_path to the directory for spilled spans")
        if self.host_budget is not None and self.disk_path is None:
            raise ValueError(
                "host_budget is set but there is no disk tier to spill to: set disk_path (a directory for an LMDB "
                "file of spilled spans), or leave host_budget unset for no host limit"
            )
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")

    def _require_resolved(self) -> None:
        missing = [name for name in _SIZE_FIELDS if getattr(self, name) is None]
        missing += ["seal_group"] if self.seal_group == "auto" else []
        if missing:
            raise ValueError(f"config fields {missing} are unset; call config.resolve(window) first")


def derive_defaults(window: int, **given: int) -> dict[str, int]:
    """The paper's shape scaled to `window` * DEFAULT_SCOPE_FRACTION, around the sizes in `given`: 32 global
    tokens, spans of 32, half the scope local (at most 8192), top_k filling the rest, query chunks of 512."""
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"the model's window (max_position_embeddings) must be a positive integer, got {window!r}")
    if window < 64 and set(_SIZE_FIELDS) - set(given):
        raise ValueError(f"a {window}-token window is too small to derive a scope from; give every size explicitly")
    scope = int(window * DEFAULT_SCOPE_FRACTION)
    sizes = dict(given)
    sizes.setdefault("span_size", min(_PAPER_SPAN, max(scope // 64, 1)))
    sizes.setdefault("global_size", min(_PAPER_GLOBAL, scope // 64))
    sizes.setdefault("local_size", min(scope // 2, _MAX_LOCAL))
    span, glob, local = sizes["span_size"], sizes["global_size"], sizes["local_size"]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (span, glob, local)) and span > 0:
        target = scope if glob + local < scope else window  # a large given local window fills the trained one
        sizes.setdefault("top_k", max((target - glob - local) // span, 0))
        sizes.setdefault("chunk_size", max(min(_PAPER_CHUNK, local - span), 1))
    return sizes


def fitting_seal_group(config: ReAttentionConfig, window: int) -> int:
    """seal_group "auto": SEAL_GROUP, or the largest group whose scope stays within `window` (at least 1; sizes that
    do not fit at all are validate's to report)."""
    sizes = (config.global_size, config.top_k, config.span_size, config.local_size)
    if config.allow_exceeding_window or not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes) \
            or config.span_size <= 0:
        return SEAL_GROUP
    room = window - (config.global_size + config.top_k * config.span_size + config.local_size)
    return max(1, min(SEAL_GROUP, room // config.span_size + 1))


def parse_bytes(value: int | str | None, name: str = "size") -> int | None:
    """An int of bytes or a string like "512MiB", "8GiB", "1.5GB", "4096" -> bytes (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name} must be a number of bytes or a string like '8GiB', got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("kmgtib")
        unit = text[len(number):]
        try:
            amount = float(number)
        except ValueError:
            amount = None
        if amount is None or unit not in _BYTE_UNITS:
            raise ValueError(f"{name}={value!r} is not a size: write bytes or e.g. '512MiB', '8GiB', '2GB'")
        value = int(amount * _BYTE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}; leave it unset for no limit")
    return value
