"""Run configuration: typed dataclasses for every section, YAML load/save, dotted overrides.

A recipe is a YAML file with the sections below. ``load_config(path, overrides)`` reads it,
applies ``section.key=value`` overrides from the command line, and checks every field against its
type and range *before anything is allocated*; all problems are reported at once in one
:class:`~lmforge.errors.ConfigError`, each naming its key path (``train.lr: ...``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import ConfigError
from lmforge.fsutil import atomic_write
from lmforge.model.config import ModelConfig


@dataclass
class RunSection:
    name: str = "run"
    out_dir: str = "runs/run"  # checkpoints, metrics.jsonl, config.yaml, training_curves.png
    seed: int = 1337
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N


@dataclass
class TokenizerSection:
    kind: str = "char"  # char, byte, bpe (trained on the data), file (an existing tokenizer.json)
    path: str | None = None  # for kind=file
    vocab_size: int = 8000  # for bpe
    train_docs: int | None = 20000  # documents used to train char/bpe vocabularies (None: all)


@dataclass
class SourceSection:
    path: str = "builtin:stories"
    text_field: str = "text"
    split: str = "train"
    name: str | None = None
    data_files: list[str] | None = None
    limit: int | None = None
    streaming: bool = False
    num_docs: int = 2000
    seed: int = 0
    doc_separator: str | None = None
    format: str | None = None  # file kind when the name has no usable extension: txt, jsonl, json, csv, tsv, parquet
    columns: list[str] | None = None  # CSV/TSV without a header row: the name of each column
    quoting: bool = True  # CSV/TSV cells may be "quoted"; false takes each line as it is
    part: str | None = None  # train, val or test: one part of a seeded split of this source's records
    part_split: list[float] | None = None  # [val, test] fractions of that split
    part_seed: int = 0  # its seed (equal to a classifier's run.seed: the same split as that run makes)
    part_stratify: str | None = None  # the field it stratifies by (a label field)
    max_operand: int | None = None  # builtin:arithmetic: operands drawn from 0..max_operand (default 99)
    ops: str | None = None  # builtin:arithmetic: the operations, e.g. "+-" (default "+-*"; "/" also exists)


@dataclass
class DataSection:
    sources: list[SourceSection] = field(default_factory=lambda: [SourceSection()])
    val_sources: list[SourceSection] | None = None
    val_fraction: float = 0.1
    test_sources: list[SourceSection] | None = None  # example tasks: evaluated once, after training
    test_fraction: float = 0.0  # example tasks: share of the training records held out as a test split
    stratify: bool = True  # example tasks: split train/val/test per label, keeping label proportions
    split: str = "shuffled"  # shuffled (seeded), or ordered (record tasks): file order, train then test then val
    balance: bool = False  # classification: undersample every label to the rarest one's count first
    cache_dir: str = ".lmforge_cache"


@dataclass
class TrainSection:
    max_steps: int = 1000
    epochs: float | None = None  # passes over the training data; sets max_steps at start-up (said there)
    batch_size: int = 16  # micro-batch per process
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine, linear, constant (after warmup)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "fp32"  # fp32, bf16 (autocast), fp16 (autocast + loss scaling, GPU only)
    compile: bool = False
    eval_every: int = 200
    eval_at_start: bool = False  # also evaluate before the first step (step 0: the "before" figures)
    eval_batches: int = 20
    eval_batch_size: int = 16  # fixed, so validation losses compare across batch sizes and process counts
    log_every: int = 10
    checkpoint_every: int | None = 1000
    checkpoint_every_hours: float | None = None
    keep_last: int | None = 3
    best_metric: str | None = "val_loss"
    best_mode: str = "min"
    patience: int | None = None  # early stopping: end after this many evaluations without a new best_metric
    resume: str | None = "auto"  # auto (newest valid checkpoint in out_dir), a checkpoint path, or never
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    progress: bool = True
    trainable: str = "all"  # all, head (classifier/LM head only), last_blocks:N (+ final norm and heads)
    backend: str = "torch"  # torch, or jax (lmforge.jax.train.fit_jax; needs pip install lmforge[jax])


@dataclass
class LoggingSection:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "lmforge"
    report: bool = True  # write report.html (curves, evals, samples, attention/weight plots) when a run ends


@dataclass
class SampleSection:
    prompt: str = ""
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float | None = None
    seed: int = 0


@dataclass
class RunConfig:
    task: str = "pretrain"  # what the run trains: a name in lmforge.tasks.TASKS (pretrain, mlm, classify)
    run: RunSection = field(default_factory=RunSection)
    model: dict = field(default_factory=lambda: {"preset": "baby"})  # ModelConfig fields (+ preset, init_from)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    objective: Any = field(default_factory=dict)  # the task's own options dataclass (validated by the task)
    train: TrainSection = field(default_factory=TrainSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    sample: SampleSection = field(default_factory=SampleSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def init_from(self) -> str | None:
        """``model.init_from``: the checkpoint or Hugging Face folder a run starts from (None: fresh)."""
        return self.model.get("init_from")

    def model_overrides(self) -> dict[str, Any]:
        """The ``model:`` keys other than preset/init_from (with init_from: changes to the loaded config)."""
        return {k: v for k, v in self.model.items() if k not in ("preset", "init_from", "lora")}

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The ModelConfig of the ``model:`` section; ``vocab_size: null`` takes the tokenizer's."""
        d = dict(self.model)
        d.pop("init_from", None)
        d.pop("lora", None)
        preset = d.pop("preset", None)
        if d.get("vocab_size") is None:
            d.pop("vocab_size", None)
            if vocab_size is not None:
                d["vocab_size"] = vocab_size
        return ModelConfig.from_preset(preset, **d) if preset else ModelConfig.from_dict(d)


# ----------------------------------------------------------------------------- type checking
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


ORDERED_SPLIT_TASKS = ("sft", "dpo", "classify", "grpo")  # tasks whose records data.split: ordered lays out
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")  # exponent form only


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses; collect problems."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], path, problems)
    if dataclasses.is_dataclass(tp):
        if tp is SourceSection and isinstance(value, str):
            value = {"path": value}  # a source may be written as its path alone
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return tp()
        return build_section(tp, value, path, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, dict)) and dataclasses.is_dataclass(item_tp):
            value = [value]  # one source may be written without the list
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return []
        return [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return {}
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)  # YAML reads 1e3 and 2e-4 (no dot) as strings
        if tp is float:
            return value
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 1e3 / 1.0e3 for an integer field
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            problems.append(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
            return None
        return value
    return value


def build_section(cls, data: dict, path: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is SourceSection and isinstance(data, str):
        data = {"path": data}
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            problems.append(f"{path}.{key}: unknown key (expected one of {', '.join(names) or '(none)'})")
            continue
        kwargs[key] = _convert(value, hints[key], f"{path}.{key}", problems)
    return cls(**{k: v for k, v in kwargs.items() if v is not None or _optional(hints[k])})


def _optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _range_problems(cfg: RunConfig, pending: tuple[str, ...] = ()) -> list[str]:
    p: list[str] = []
    t = cfg.train

    def need(ok: bool, msg: str) -> None:
        if not ok:
            p.append(msg)

    need(t.max_steps > 0, f"train.max_steps: got {t.max_steps}, expected a positive integer")
    need(t.epochs is None or t.epochs > 0, f"train.epochs: got {t.epochs}, expected a positive number or null")
    need(t.epochs is None or t.backend == "torch", "train.epochs: the JAX backend trains by train.max_steps; "
         "expected train.epochs: null with train.backend: jax")
    need(t.patience is None or (t.patience >= 1 and t.best_metric is not None),
         f"train.patience: got {t.patience}, expected an integer >= 1 (evaluations without a new best of "
         f"train.best_metric, which must be set) or null")
    need(t.batch_size > 0, f"train.batch_size: got {t.batch_size}, expected a positive integer")
    need(t.grad_accum > 0, f"train.grad_accum: got {t.grad_accum}, expected a positive integer")
    need(t.lr > 0, f"train.lr: got {t.lr}, expected a positive number")
    need(t.eps > 0, f"train.eps: got {t.eps}, expected a positive number (e.g. 1e-8)")
    need(t.checkpoint_every_hours is None or t.checkpoint_every_hours > 0,
         f"train.checkpoint_every_hours: got {t.checkpoint_every_hours}, expected a positive number or null")
    need(_trainable_ok(t.trainable), f"train.trainable: got {t.trainable!r}, expected all, head or last_blocks:N (N >= 1)")
    need(0 <= t.min_lr <= t.lr, f"train.min_lr: got {t.min_lr}, expected 0 <= min_lr <= lr ({t.lr})")
    need(t.warmup_steps >= 0, f"train.warmup_steps: got {t.warmup_steps}, expected >= 0")
    need(t.weight_decay >= 0, f"train.weight_decay: got {t.weight_decay}, expected >= 0")
    need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, f"train.beta1/beta2: got ({t.beta1}, {t.beta2}), expected values in [0, 1)")
    need(t.grad_clip >= 0, f"train.grad_clip: got {t.grad_clip}, expected >= 0 (0 disables)")
    need(t.precision in ("fp32", "bf16", "fp16"), f"train.precision: got {t.precision!r}, expected fp32, bf16 or fp16")
    need(t.schedule in ("cosine", "linear", "constant"), f"train.schedule: got {t.schedule!r}, expected cosine, linear or constant")
    need(t.backend in ("torch", "jax"), f"train.backend: got {t.backend!r}, expected torch or jax")
    need(t.best_mode in ("min", "max"), f"train.best_mode: got {t.best_mode!r}, expected min or max")
    need(t.eval_every > 0, f"train.eval_every: got {t.eval_every}, expected a positive integer")
    need(t.eval_batches > 0, f"train.eval_batches: got {t.eval_batches}, expected a positive integer")
    need(t.eval_batch_size > 0, f"train.eval_batch_size: got {t.eval_batch_size}, expected a positive integer")
    need(t.log_every > 0, f"train.log_every: got {t.log_every}, expected a positive integer")
    need(t.max_nonfinite > 0, f"train.max_nonfinite: got {t.max_nonfinite}, expected a positive integer")
    need(t.checkpoint_every is None or t.checkpoint_every > 0,
         f"train.checkpoint_every: got {t.checkpoint_every}, expected a positive integer or null")
    need(t.keep_last is None or t.keep_last > 0, f"train.keep_last: got {t.keep_last}, expected a positive integer or null")
    tk = cfg.tokenizer
    need(tk.kind in ("char", "byte", "bpe", "file"), f"tokenizer.kind: got {tk.kind!r}, expected char, byte, bpe or file")
    need(tk.kind != "file" or bool(tk.path), "tokenizer.path: required when tokenizer.kind is file")
    need(tk.vocab_size > 0, f"tokenizer.vocab_size: got {tk.vocab_size}, expected a positive integer")
    d = cfg.data
    need(0 <= d.val_fraction < 1, f"data.val_fraction: got {d.val_fraction}, expected a number in [0, 1)")
    need(d.val_fraction > 0 or bool(d.val_sources), "data.val_fraction: 0 needs data.val_sources for evaluation")
    need(len(d.sources) > 0, "data.sources: expected at least one source")
    need(0 <= d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1,
         f"data.test_fraction: got {d.test_fraction}, expected a number in [0, 1) with val_fraction + test_fraction < 1")
    need(d.split in ("shuffled", "ordered"), f"data.split: got {d.split!r}, expected shuffled or ordered")
    need(d.split == "shuffled" or cfg.task in ORDERED_SPLIT_TASKS,
         f"data.split: ordered splits the records of tasks {', '.join(ORDERED_SPLIT_TASKS)}; task {cfg.task} reads "
         f"token streams (use data.val_fraction)")
    s = cfg.sample
    need(s.max_new_tokens >= 0, f"sample.max_new_tokens: got {s.max_new_tokens}, expected an integer >= 0")
    need(s.temperature >= 0, f"sample.temperature: got {s.temperature}, expected a number >= 0 (0: greedy)")
    need(s.top_k is None or s.top_k >= 1, f"sample.top_k: got {s.top_k}, expected a positive integer or null")
    need(s.top_p is None or 0 < s.top_p <= 1, f"sample.top_p: got {s.top_p}, expected a number in (0, 1] or null")
    p += _device_problems(cfg.run.device)
    p += _precision_problems(t.precision, cfg.run.device)
    out = Path(cfg.run.out_dir)
    need(not out.exists() or out.is_dir(), f"run.out_dir: {out} exists and is not a folder; expected a folder path")
    return p


def _trainable_ok(spec: str) -> bool:
    if spec in ("all", "head"):
        return True
    name, _, n = spec.partition(":")
    return name == "last_blocks" and n.isdigit() and int(n) >= 1


def _precision_problems(precision: str, device: str) -> list[str]:
    """fp16 training (loss scaling) runs on CUDA only: refused here, before any data is read."""
    if precision != "fp16" or device.startswith("cuda"):
        return []
    import torch

    if device == "auto" and torch.cuda.is_available():
        return []
    return [f"train.precision: fp16 (autocast + loss scaling) needs a CUDA device and run.device is {device!r}"
            f"{' with no CUDA device here' if device == 'auto' else ''}; use fp32 (or bf16 where the CPU supports it)"]


def _device_problems(device: str) -> list[str]:
    """run.device must name a device this machine has: checked before anything is allocated."""
    if device in ("auto", "cpu"):
        return []
    if not device.startswith("cuda") or not (device == "cuda" or device[5:].isdigit() and device[4] == ":"):
        return [f"run.device: got {device!r}, expected auto, cpu, cuda or cuda:N"]
    import torch

    if not torch.cuda.is_available():
        return [f"run.device: got {device!r} but no CUDA device is available here; expected cpu or auto"]
    if ":" in device and int(device[5:]) >= torch.cuda.device_count():
        return [f"run.device: got {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"]
    return []


def config_from_dict(data: dict, *, pending_paths: tuple[str, ...] = (), extra_problems=None) -> RunConfig:
    """Build and validate a RunConfig; raises one ConfigError listing every problem.

    This checks the sections every run shares; the ``objective:`` section stays a mapping. The
    task registry's :func:`lmforge.tasks.config_from_dict` (what the CLI and the run use) adds
    the task's options and checks through ``extra_problems(cfg, pending_paths) -> problems``,
    called before the problems are raised so that one error lists them all.

    ``pending_paths``: ``model.init_from`` values that need not exist yet (the run folder an
    earlier stage of a multi-stage recipe writes, lmforge.tasks.pipeline)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(data).__name__}")
    if "stages" in data:
        raise ConfigError("stages: a multi-stage recipe is not one run; run it with lmforge train -c FILE "
                          "(lmforge.tasks.pipeline.load_pipeline reads it)")
    problems: list[str] = []
    cfg = build_section(RunConfig, data, "config", problems)
    problems = [p.removeprefix("config.") for p in problems]
    # Range checks run even after type problems (a field of the wrong type kept its default, so
    # it is not reported twice): every problem of the config is reported at once.
    typed = {p.split(":", 1)[0] for p in problems}
    problems += [p for p in _range_problems(cfg, tuple(pending_paths)) if p.split(":", 1)[0] not in typed]
    if extra_problems is not None:
        problems += extra_problems(cfg, tuple(pending_paths))
    if not cfg.init_from:  # the model section validates as a ModelConfig (vocab_size may come from the tokenizer)
        try:
            cfg.model_config(vocab_size=cfg.model.get("vocab_size") or 1)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return cfg


class _YAMLLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float: PyYAML follows YAML 1.1, where an exponent
    without a dot is a string, so ``train.lr=3e-4`` would otherwise fail the float check."""


_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=3e-4", "model.n_layer=6"]`` -> nested dict; values are parsed as YAML."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: expected key.path=value")
        try:
            value = _load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set to a value and used as a section")
        node[parts[-1]] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def read_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """A recipe file (or nothing) with ``section.key=value`` overrides merged in, as a mapping."""
    data = read_yaml(path) if path else {}
    if overrides:
        data = merge(data, parse_overrides(overrides))
    return data


def save_config(cfg: RunConfig, path: str | Path) -> None:
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(Path(path), lambda p: p.write_text(text))
