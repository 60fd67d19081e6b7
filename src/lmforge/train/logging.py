"""Training logs: JSONL metrics (+ optional TensorBoard / Weights & Biases), a progress bar, MFU.

A run folder gets, from rank 0 only::

    metrics.jsonl   one JSON object per line: {"step", "split", "time", **metrics}, flushed per line
    config.yaml     the resolved run config (``save_run_info``)
    run_info.json   git commit, versions, device, argv, start time (``save_run_info``)

``metrics.jsonl`` is the source of truth: ``read_metrics`` parses it (tolerating a last line cut
short by a crash) and ``lmforge.inspect.plots`` draws it. TensorBoard and W&B are optional
mirrors; enabling one whose package is absent is a :class:`~lmforge.errors.ConfigError`.

MFU (model FLOPs utilization) is achieved FLOP/s over the hardware's peak: ``flops_per_token *
tokens_per_s / peak``. ``flops_per_token`` should count forward and backward (about ``6 * N``
for ``N`` parameters, plus attention).
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from lmforge.errors import ConfigError, DataError
from lmforge.fsutil import atomic_write
from lmforge.version import __version__

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"
_RESERVED = ("step", "split", "time")


# --- metrics sinks -----------------------------------------------------------------------
def _require(package: str, extra: str, field: str) -> None:
    """Raise a one-line ConfigError when an optional sink's package is not installed."""
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{field}: {package} logging is enabled but the {package} package is not "
                          f"installed; run `pip install lmforge[{extra}]` or set {field}: false")


def _open_tensorboard(log_dir: Path):
    """A TensorBoard ``SummaryWriter`` writing into ``log_dir``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # tensorboard present but unusable (e.g. a broken install)
        raise ConfigError(f"logging.tensorboard: cannot import TensorBoard ({e}); "
                          "run `pip install lmforge[tensorboard]`") from None
    return SummaryWriter(log_dir=str(log_dir))


def _number(key: str, value: Any) -> int | float:
    """A metric value as a plain int or float (accepts Python, NumPy and 0-d torch scalars)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
        return value if isinstance(value, int) else float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {key!r}: expected a number, got {type(value).__name__}") from None


class MetricsLogger:
    """Writes metrics to every enabled sink. Only rank 0 writes (is_main=False -> no-op).

    Sinks: ``run_dir/metrics.jsonl`` (always), TensorBoard event files in ``run_dir/tensorboard``
    (``tensorboard=True``), and a Weights & Biases run (``wandb=True``). Missing optional
    packages are reported on every rank, so a misconfigured multi-process run fails everywhere
    instead of only on rank 0. The JSONL file is opened in append mode, so a resumed run keeps
    its history. Usable as a context manager.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "lmforge", run_name: str | None = None,
                 config: dict | None = None, is_main: bool = True):
        if tensorboard:
            _require("tensorboard", "tensorboard", "logging.tensorboard")
        if wandb:
            _require("wandb", "wandb", "logging.wandb")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.is_main = is_main
        self._file = None
        self._tb = None
        self._wandb_run = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self._tb = _open_tensorboard(self.run_dir / "tensorboard")
        if wandb:
            import wandb as _wandb

            self._wandb_run = _wandb.init(project=wandb_project, name=run_name,
                                          config=_plain(config or {}), dir=str(self.run_dir))

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        """Record ``metrics`` at optimizer step ``step`` for ``split`` ("train", "val", ...)."""
        if not self.is_main:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsLogger for {self.run_dir} is closed")
        for key in metrics:
            if key in _RESERVED:
                raise ValueError(f"metric name {key!r} is reserved (reserved: {', '.join(_RESERVED)})")
        values = {k: _number(k, v) for k, v in metrics.items()}
        record = {"step": int(step), "split": split, "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", v, int(step))
        if self._wandb_run is not None:
            self._wandb_run.log({f"{split}/{k}": v for k, v in values.items()}, step=int(step))

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Drop the rows logged after ``step`` (a resumed run re-runs those steps), atomically, so
    every curve stays single-valued. Returns how many rows were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the crash we resume from
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        atomic_write(path, "".join(k + "\n" for k in kept))
    return dropped


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Parse a ``metrics.jsonl`` file (or a run folder holding one) into a list of dicts.

    A last line cut short by a crash is skipped; a corrupt line anywhere else is a DataError.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such metrics file; expected a metrics.jsonl written by a run")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # truncated by a crash mid-write
                break
            raise DataError(f"{path}:{i + 1}: not valid JSON; expected one metrics record per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{i + 1}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


# --- progress bar ------------------------------------------------------------------------
def _human(x: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _duration(seconds: float) -> str:
    """3725 -> '1h02m05s'."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """A tqdm progress bar over optimizer steps showing loss, lr, tokens/s, MFU and ETA (tqdm's own ETA). Disabled (but still usable) when not main or when disable=True; in non-TTY (CI) environments print a plain line every `print_every` steps instead of redrawing.

    Output goes to stderr (as tqdm's does), leaving stdout to the program. ``update`` takes the
    absolute number of optimizer steps done, so a resumed run passes ``initial`` and continues.
    ``write`` prints on the main rank even with ``disable=True`` (only the bar is disabled);
    on other ranks every method is a no-op. Usable as a context manager.
    """

    def __init__(self, total_steps: int, initial: int = 0, disable: bool = False,
                 is_main: bool = True, print_every: int = 50):
        self.total = int(total_steps)
        self.initial = int(initial)
        self.is_main = is_main
        self.print_every = max(1, int(print_every))
        self._stream = sys.stderr
        self.enabled = is_main and not disable
        self.tty = self.enabled and _is_tty(self._stream)
        self._bar = None
        self._start = time.perf_counter()
        self._step = self.initial
        self._last_line: str | None = None
        self._last_printed_step: int | None = None
        # The ETA counts from the end of the first step: that step also pays for warm-up (the
        # first generation, kernels, caches) and made a 2.6-minute GRPO run promise 42 minutes.
        self._first: tuple[int, float] | None = None  # (step, time) of the first update

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float,
               mfu: float | None = None, **extra) -> None:
        """Show the state after ``step`` optimizer steps (absolute, not a delta)."""
        if not self.enabled:
            return
        step = int(step)
        fields = {"loss": f"{float(loss):.4f}", "lr": f"{float(lr):.2e}",
                  "tok/s": _human(float(tokens_per_s))}
        if mfu is not None:
            fields["mfu"] = f"{100 * float(mfu):.1f}%"
        fields.update({k: _fmt(v) for k, v in extra.items()})
        if self._first is None:
            self._first = (step, time.perf_counter())
            if self.tty:  # the bar starts its clock (and its rate) after the first step
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, initial=step, unit="step", file=self._stream,
                                 dynamic_ncols=True, smoothing=0.1)
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)
            self._bar.update(step - self._bar.n)
            self._step = step
            return
        first = self._last_printed_step is None
        self._step = step
        self._last_line = self._plain_line(step, fields)
        if first or step % self.print_every == 0 or step >= self.total:
            self._print(self._last_line)
            self._last_printed_step = step

    def _plain_line(self, step: int, fields: dict[str, str]) -> str:
        now = time.perf_counter()
        elapsed = now - self._start
        first_step, first_time = self._first or (self.initial, self._start)
        done = step - first_step  # steps timed after the first (warm-up) one
        eta = f"{_duration(max((self.total - step) * (now - first_time) / done, 0.0))}" if done > 0 else \
            ("0s" if step >= self.total else "? (after the first step)")
        width = len(str(self.total))
        parts = [f"step {step:>{width}}/{self.total}"] + [f"{k} {v}" for k, v in fields.items()]
        parts += [f"elapsed {_duration(elapsed)}", f"eta {eta}"]
        return " | ".join(parts)

    def _print(self, msg: str) -> None:
        print(msg, file=self._stream, flush=True)

    def write(self, msg: str) -> None:
        """Print a line above the bar (eval results, checkpoint saved)."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(msg, file=self._stream)
        else:
            self._print(msg)

    def close(self) -> None:
        """Close the bar; in plain mode print the last state if it was not printed (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._last_line is not None and self._last_printed_step != self._step:
            self._print(self._last_line)
            self._last_printed_step = self._step

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Metrics shown beside the loss on progress lines when a step reports them (GRPO's loss is ~0 by
# construction: its reward is what moves; DPO's margin).
PROGRESS_EXTRAS = ("reward", "rewards/margins")


class Phase:
    """A long stretch outside the training loop (test answers, final evaluations, the report),
    shown as it goes: a line at the start, ``label: 40/110 (12s, eta 21s)`` every ``every``
    seconds, and ``label: 110 in 33s`` at the end. ``say`` None keeps it silent.

        phase = Phase("test answers", len(prompts), say)
        for batch in phase.track(batches):   # or phase.advance(n) by hand
            ...
        phase.end()
    """

    def __init__(self, label: str, total: int, say=print, every: float = 10.0, unit: str = ""):
        self.label, self.total, self.say, self.every = label, int(total), say, float(every)
        self.unit = f" {unit}" if unit else ""
        self.done = 0
        self._start = self._last = time.perf_counter()
        self._ended = False
        if say is not None:
            say(f"{label}: {self.total}{self.unit} ...")

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.say is not None and now - self._last >= self.every and self.done < self.total:
            spent = now - self._start
            eta = (self.total - self.done) * spent / self.done
            self.say(f"{self.label}: {self.done}/{self.total}{self.unit} ({_duration(spent)}, eta {_duration(eta)})")
            self._last = now

    def track(self, items: Iterable, size=lambda item: 1) -> Iterable:
        """Yield ``items``, advancing by ``size(item)`` after each; ends the phase after the last."""
        for item in items:
            yield item
            self.advance(size(item))
        self.end()

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self.say is not None:
            self.say(f"{self.label}: {self.done or self.total}{self.unit} in {_duration(time.perf_counter() - self._start)}")


# --- MFU -----------------------------------------------------------------------------------
CPU_PEAK_FLOPS = 250e9  # fp32 FLOP/s of this project's 2-core reference machine
PEAK_FLOPS_ENV = "LMFORGE_PEAK_FLOPS"

# Dense (no sparsity) peaks in FLOP/s by GPU: half = bf16/fp16 tensor cores, tf32 = fp32
# matmuls on tensor cores (torch's "high"/"medium" float32 matmul precision), fp32 = plain CUDA cores.
# Matched against torch.cuda.get_device_name(), most specific first.
_GPU_PEAKS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (("H100", "PCIE"), {"half": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (("H100", "NVL"), {"half": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (("H100",), {"half": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    (("H200",), {"half": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    (("A100",), {"half": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)


def _dtype_kind(dtype) -> str:
    """'half' for bf16/fp16, 'fp32' for float32 (and anything else)."""
    if dtype is None:
        return "half"
    name = str(dtype).replace("torch.", "").lower()
    if name in ("bfloat16", "bf16", "float16", "fp16", "half", "bf16-mixed", "fp16-mixed"):
        return "half"
    return "fp32"


def gpu_peak_flops(device_name: str, dtype=None, tf32: bool | None = None) -> float | None:
    """Peak FLOP/s of a GPU named ``device_name`` for ``dtype`` (None = bf16), or None if unknown.

    For fp32, ``tf32`` says whether matmuls may use TF32 tensor cores (default: torch's current
    float32 matmul precision).
    """
    upper = device_name.upper()
    for needles, peaks in _GPU_PEAKS:
        if all(n in upper for n in needles):
            if _dtype_kind(dtype) == "half":
                return peaks["half"]
            if tf32 is None:
                tf32 = torch.get_float32_matmul_precision() != "highest"
            return peaks["tf32"] if tf32 else peaks["fp32"]
    return None


def peak_flops(device, dtype=None) -> float | None:
    """Peak FLOP/s of ``device`` for compute ``dtype``, or None when unknown.

    ``LMFORGE_PEAK_FLOPS`` (a number, e.g. ``1e12``) overrides the table for any device. CPU:
    250e9. CUDA: looked up by device name (H100/H200, A100); ``dtype`` None means bf16.
    """
    env = os.environ.get(PEAK_FLOPS_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{PEAK_FLOPS_ENV}: expected a positive number of FLOP/s, got {env!r}")
        return value
    dev = torch.device(device)
    if dev.type == "cpu":
        return CPU_PEAK_FLOPS
    if dev.type == "cuda" and torch.cuda.is_available():
        return gpu_peak_flops(torch.cuda.get_device_name(dev), dtype)
    return None


def mfu(flops_per_token: float, tokens_per_s: float, device, dtype=None) -> float | None:
    """Model FLOPs utilization: fraction of ``device``'s peak (see :func:`peak_flops`) achieved.

    Returns None when the peak is unknown. ``dtype`` is the compute dtype (bf16/fp16 autocast or
    fp32); None means bf16 on GPU. On CPU the dtype does not matter.
    """
    peak = peak_flops(device, dtype)
    if peak is None:
        return None
    return float(flops_per_token) * float(tokens_per_s) / peak


# --- run provenance ------------------------------------------------------------------------
def _git(args: list[str], path: str | os.PathLike) -> str | None:
    p = Path(path)
    if p.is_file():
        p = p.parent
    try:
        out = subprocess.run(["git", *args], cwd=p, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # git missing, path missing, timeout
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit(path: str | os.PathLike = ".") -> str | None:
    """Current commit hash of the git repository containing ``path``, None if not a repo."""
    out = _git(["rev-parse", "HEAD"], path)
    return (out.strip() or None) if out is not None else None


def _git_dirty(path: str | os.PathLike) -> bool | None:
    """True when tracked files have uncommitted changes, None if not a repo."""
    out = _git(["status", "--porcelain", "--untracked-files=no"], path)
    return None if out is None else bool(out.strip())


def _plain(obj: Any) -> Any:
    """``obj`` converted to YAML/JSON-safe builtins (dataclasses, paths, tuples, dtypes, ...)."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return _plain(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _device_summary() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device"] = f"cuda ({torch.cuda.get_device_name(0)})"
        info["gpu_count"] = torch.cuda.device_count()
    else:
        info["device"] = "cpu"
    return info


def save_run_info(run_dir: str | os.PathLike, config: dict) -> None:
    """Write ``run_dir/config.yaml`` (the resolved config) and ``run_dir/run_info.json``.

    run_info.json holds the git commit (of the lmforge source tree, else of the working
    directory) and whether tracked files were modified, torch/lmforge/Python versions, the
    device, ``sys.argv`` and the start time (UTC, ISO 8601). Calling it again on resume keeps
    earlier starts under ``previous_starts``. Both files are written atomically. Call on rank 0.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / CONFIG_FILE, yaml.safe_dump(_plain(config), sort_keys=False))

    repo = Path(__file__).resolve().parent
    commit = git_commit(repo)
    if commit is None:
        repo = Path.cwd()
        commit = git_commit(repo)
    info: dict[str, Any] = {
        "start_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": _git_dirty(repo) if commit else None,
        "lmforge_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "hostname": platform.node(),
        **_device_summary(),
        "argv": list(sys.argv),
    }
    previous = _previous_starts(run_dir / RUN_INFO_FILE)
    if previous:
        info["previous_starts"] = previous
    atomic_write(run_dir / RUN_INFO_FILE, json.dumps(info, indent=2) + "\n")


def _previous_starts(path: Path) -> list[dict]:
    """Start records of earlier launches of this run (resumes), oldest first."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict):
        return []
    keep: Iterable[str] = ("start_time", "git_commit", "argv")
    return list(old.get("previous_starts", [])) + [{k: old.get(k) for k in keep}]
