"""Shared fixtures: a tiny run config (1 layer, width 32, context 32) on the built-in stories,
with a token cache shared by the whole session so each corpus is tokenized once."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

# One thread per process: the test models are tiny, and on a small shared CPU several OpenMP
# threads spin against each other (100x slower). Subprocesses (CLI, torchrun) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Test files import the helpers below as `from tests.conftest import ...` (importlib import mode,
# repository root on sys.path: see pyproject's [tool.pytest.ini_options]). Under the old flat
# layout they were imported as `from conftest import ...`; this alias keeps that spelling working
# (the same module object, not a second copy) for test files written before the move.
sys.modules.setdefault("conftest", sys.modules[__name__])

# The recipes' named datasets (catalog:NAME) from shared/data beside the checkout when it is there
# (as .ci/run sets it), so tests never download them.
_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if _SHARED_DATA.is_dir():
    os.environ.setdefault("LMFORGE_DATA_MIRROR", str(_SHARED_DATA))


def tiny_run_dict(out_dir: Path, cache_dir: Path) -> dict:
    """A run small enough to train a few steps on a shared 2-core CPU in about a second."""
    return {
        "run": {"name": "tiny", "out_dir": str(out_dir), "seed": 0, "device": "cpu"},
        "model": {"arch": "decoder", "n_layer": 1, "n_head": 2, "n_embd": 32, "context_length": 32,
                  "vocab_size": None, "dropout": 0.0},
        "tokenizer": {"kind": "char"},
        "data": {"sources": [{"path": "builtin:stories", "num_docs": 200, "seed": 0}],
                 "val_fraction": 0.1, "cache_dir": str(cache_dir)},
        "train": {"max_steps": 6, "batch_size": 8, "grad_accum": 1, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 2, "eval_every": 1000, "eval_batches": 2, "log_every": 1,
                  "checkpoint_every": None, "resume": "auto", "progress": False},
        "sample": {"max_new_tokens": 0},
        "logging": {"report": False},  # report.html has its own tests; tiny runs skip it for speed
    }


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lmforge_cache")


@pytest.fixture(scope="session")
def run_dict(token_cache):
    """``run_dict(out_dir, **sections)``: the tiny run as a dict with its run folder anywhere
    (for module-scoped fixtures, which cannot use ``tmp_path``)."""

    def make(out_dir: Path, **sections) -> dict:
        return deep_merge(tiny_run_dict(out_dir, token_cache), sections)

    return make


@pytest.fixture
def tiny_dict(tmp_path, token_cache):
    """``tiny_dict(name="run", **sections)``: the tiny run as a dict, run folder ``tmp_path/name``,
    with ``sections`` deep-merged in (``train={"max_steps": 3}``)."""

    def make(name: str = "run", **sections) -> dict:
        return deep_merge(tiny_run_dict(tmp_path / name, token_cache), sections)

    return make


@pytest.fixture
def tiny_config(tiny_dict):
    """``tiny_config(name="run", **sections)``: a validated RunConfig of the tiny run."""
    from lmforge.tasks import config_from_dict

    def make(name: str = "run", **sections):
        return config_from_dict(tiny_dict(name, **sections))

    return make


@pytest.fixture
def tiny_yaml(tiny_dict, tmp_path):
    """``tiny_yaml(name="run", **sections)``: the tiny run written to ``tmp_path/<name>.yaml``."""

    def make(name: str = "run", **sections) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_dict(name, **sections), sort_keys=False))
        return path

    return make


def run_in_two_parts(make_config, n: int) -> tuple[dict, dict]:
    """``make_config()`` run stopped after step ``n`` (as SIGINT would), then run again, which
    resumes from that checkpoint (train.resume: auto): the two summaries."""
    from lmforge.train.callbacks import StopAtStep
    from lmforge.tasks.run import run

    def quiet(*a, **k):
        pass

    first = run(make_config(), progress=False, print_fn=quiet, callbacks=[StopAtStep(n)])
    assert first["stopped_early"] and first["steps"] == n
    second = run(make_config(), progress=False, print_fn=quiet)
    return first, second


def shrunk_recipe(name: str, out_dir: Path, **train) -> dict:
    """``configs/<name>.yaml`` as a dict, writing to ``out_dir``, its ``train:`` updated with ``train``
    (progress off): the teaching recipes' golden-curve tests run them a few steps at a time."""
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml").read_text())
    raw["run"]["out_dir"] = str(out_dir)
    raw["train"].update(progress=False, **train)
    return raw


def shrunk_arithmetic_sft(out_dir: Path, token_cache: Path) -> dict:
    """Stage 1 of the teaching recipes (configs/arithmetic-sft.yaml) shrunk to a 1-layer model
    and 6 steps on 300 problems."""
    sft = shrunk_recipe("arithmetic-sft", out_dir, max_steps=6, eval_every=6, checkpoint_every=6, batch_size=8)
    sft["model"].update(n_layer=1, n_embd=32, n_head=2)
    sft["data"]["cache_dir"] = str(token_cache)
    sft["data"]["sources"][0]["num_docs"] = 300
    sft["sample"]["max_new_tokens"] = 0
    return sft


def loss_metrics_grads(objective, model, batches: list[dict]) -> list[tuple]:
    """(loss, metrics, gradients) of ``objective`` on each batch, from the same model weights:
    for checking that two layouts of one batch train the same."""
    out = []
    for b in batches:
        model.zero_grad()
        loss, m = objective.loss(model, b)
        loss.backward()
        out.append((loss.detach(), m, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    return out


@pytest.fixture(scope="session")
def arithmetic_lm(run_dict, tmp_path_factory) -> str:
    """A tiny causal LM pretrained on built-in arithmetic text (4 steps): the starting point of the
    GRPO and PPO task tests; its run folder (read only: tests start from it with init_from)."""
    from lmforge.tasks import config_from_dict
    from lmforge.tasks.run import run

    out = tmp_path_factory.mktemp("arithmetic") / "lm"
    d = run_dict(out, data={"sources": [{"path": "builtin:arithmetic", "num_docs": 400, "seed": 0}]},
                 model={"context_length": 40}, train={"max_steps": 4, "checkpoint_every": 4})
    return run(config_from_dict(d), progress=False, print_fn=lambda *a, **k: None)["run_dir"]
