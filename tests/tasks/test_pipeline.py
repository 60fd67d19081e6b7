"""Multi-stage recipes (lmforge.tasks.pipeline): stages chained through init_from in one run folder,
skipped once finished, resumed when cut off; one report; one-line errors; the shipped pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmforge.cli import main as cli_main
from lmforge.tasks import load_config
from lmforge.errors import ConfigError
from lmforge.train import checkpoint as ckpt
from lmforge.train.callbacks import Callback, StopAtStep
from lmforge.tasks.pipeline import DONE_FILE, SUMMARY_FILE, load_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = sorted((ROOT / "configs").glob("pipeline-*.yaml"))


def _quiet(*a, **k):
    pass


@pytest.fixture
def pipeline_yaml(tiny_dict, tmp_path):
    """``pipeline_yaml(stages=None, **top)``: a 2-stage tiny pipeline (a: pretrain 4 steps ->
    b: 3 more steps from a's weights) written to ``tmp_path/pipe.yaml``; the tiny run's sections
    sit at the top (every stage) and ``top`` is merged over them."""

    def make(stages: list | None = None, **top) -> Path:
        d = tiny_dict("unused")
        d["run"] = {"name": "pipe", "out_dir": str(tmp_path / "pipe"), "seed": 0, "device": "cpu"}
        d["train"].update({"best_metric": "val_loss", "eval_every": 2})
        d.update(top)
        d["stages"] = stages if stages is not None else [
            {"name": "a", "overrides": ["train.max_steps=4"]},
            {"name": "b", "train": {"max_steps": 3, "lr": 1e-3, "warmup_steps": 0}},
        ]
        path = tmp_path / "pipe.yaml"
        path.write_text(yaml.safe_dump(d, sort_keys=False))
        return path

    return make


class _FirstWeights(Callback):
    """Keeps a copy of the weights the stage starts training from."""

    def __init__(self):
        self.state = None

    def on_fit_start(self, trainer) -> None:
        self.state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=lambda m: f"{k}: {m}")


# ----------------------------------------------------------------------------- running
def test_two_stages_chain_report_and_skip_when_done(pipeline_yaml, tmp_path):
    pipe = load_pipeline(pipeline_yaml())
    top = tmp_path / "pipe"
    assert [s.cfg.run.out_dir for s in pipe.stages] == [str(top / "a"), str(top / "b")]
    assert pipe.stages[0].cfg.init_from is None and pipe.stages[1].cfg.init_from == str(top / "a")
    assert pipe.stages[0].cfg.train.max_steps == 4 and pipe.stages[1].cfg.train.max_steps == 3

    seen = _FirstWeights()
    out = run_pipeline(pipe, progress=False, print_fn=_quiet, stage_callbacks={"b": [seen]})
    assert out["ran"] == ["a", "b"] and not out["stopped_early"] and out["steps"] == 3
    # stage b started from stage a's best checkpoint (its weights exactly)
    best_a = top / "a" / "checkpoints" / "best"
    assert out["stages"]["a"]["best_checkpoint"] == str(best_a)
    _assert_same(_weights(best_a), {k: v for k, v in seen.state.items() if k in _weights(best_a)})
    assert out["stages"]["b"]["steps"] == 3
    for name in ("a", "b"):
        done = json.loads((top / name / DONE_FILE).read_text())
        assert done["stage"] == name and done["summary"]["steps"] == {"a": 4, "b": 3}[name]
        assert "history" not in done["summary"]
    record = json.loads((top / SUMMARY_FILE).read_text())
    assert [s["name"] for s in record["stages"]] == ["a", "b"]
    assert [s["status"] for s in record["stages"]] == ["done", "done"]
    assert record["stages"][1]["init_from"] == str(top / "a")
    page = (top / "report.html").read_text()
    assert "pipeline report: pipe" in page and "<td>b</td>" in page

    # a second invocation skips both, saying so, and trains nothing
    lines: list[str] = []
    again = run_pipeline(load_pipeline(pipeline_yaml()), progress=False, print_fn=lines.append)
    assert again["ran"] == [] and again["skipped"] == ["a", "b"]
    assert sum("done earlier" in line and "skipping" in line for line in lines) == 2
    assert any("nothing to train" in line for line in lines)
    assert len((top / "b" / "metrics.jsonl").read_text().splitlines()) == \
        len([r for r in out["stages"]["b"]["evals"]]) + 3  # no step was run twice

    # retraining stage a makes stage b start over (its checkpoints grew from the old weights)
    (top / "a" / DONE_FILE).unlink()
    lines.clear()
    third = run_pipeline(load_pipeline(pipeline_yaml()), progress=False, print_fn=lines.append)
    assert third["ran"] == ["a", "b"] and third["stages"]["b"]["resumed_from"] is None
    assert any("moved them to" in line for line in lines) or list(top.glob("b/checkpoints.*"))


def test_an_interrupted_second_stage_resumes_and_matches_an_uninterrupted_one(pipeline_yaml, tmp_path):
    first = run_pipeline(load_pipeline(pipeline_yaml()), progress=False, print_fn=_quiet,
                         stage_callbacks={"b": [StopAtStep(1)]})
    top = tmp_path / "pipe"
    assert first["stopped_early"] and first["stage"] == "b" and first["steps"] == 1
    assert (top / "a" / DONE_FILE).is_file() and not (top / "b" / DONE_FILE).is_file()
    assert json.loads((top / SUMMARY_FILE).read_text())["stages"][1]["status"] == "stopped"
    lines: list[str] = []
    second = run_pipeline(load_pipeline(pipeline_yaml()), progress=False, print_fn=lines.append)
    assert second["skipped"] == ["a"] and second["ran"] == ["b"] and not second["stopped_early"]
    assert second["stages"]["b"]["resumed_from"].endswith(ckpt.step_name(1))
    assert second["stages"]["b"]["steps"] == 3 and (top / "b" / DONE_FILE).is_file()

    # the same pipeline in one go elsewhere: stage b ends with the same weights
    whole = run_pipeline(load_pipeline(pipeline_yaml(), [f"run.out_dir={tmp_path / 'whole'}"]),
                         progress=False, print_fn=_quiet)
    assert whole["ran"] == ["a", "b"]
    last = ckpt.step_name(3)
    _assert_same(_weights(top / "b" / "checkpoints" / last), _weights(tmp_path / "whole" / "b" / "checkpoints" / last))


def test_init_last_takes_the_final_checkpoint_and_overrides_reach_one_or_every_stage(pipeline_yaml, tmp_path):
    stages = [{"name": "a", "train": {"max_steps": 4, "eval_every": 1}},
              {"name": "b", "init": "last", "train": {"max_steps": 2}}]
    path = pipeline_yaml(stages)
    pipe = load_pipeline(path, ["train.lr=2e-3", "b.train.max_steps=3", "a.train.max_steps=5", "run.seed=7"])
    a, b = pipe.stages
    assert a.cfg.train.lr == b.cfg.train.lr == 2e-3 and a.cfg.run.seed == b.cfg.run.seed == 7
    assert (a.cfg.train.max_steps, b.cfg.train.max_steps) == (5, 3)
    assert b.cfg.init_from == str(tmp_path / "pipe" / "a" / "checkpoints" / ckpt.step_name(5))
    pipe = load_pipeline(path, ["a.train.max_steps=2"])
    seen = _FirstWeights()
    out = run_pipeline(pipe, progress=False, print_fn=_quiet, stage_callbacks={"b": [seen]})
    final_a = Path(out["stages"]["a"]["last_checkpoint"])
    assert final_a.name == ckpt.step_name(2)
    w = _weights(final_a)
    _assert_same(w, {k: v for k, v in seen.state.items() if k in w})


def test_print_config_and_dry_run_show_every_stage(pipeline_yaml, tmp_path, capsys):
    path = pipeline_yaml()
    assert cli_main(["train", "-c", str(path), "--dry-run", "b.train.max_steps=9"]) == 0
    out = capsys.readouterr().out
    assert "# stage 1/2: a (task pretrain" in out and "# stage 2/2: b (task pretrain" in out
    assert f"starting from {tmp_path / 'pipe' / 'a'}" in out and "max_steps: 9" in out
    assert "# dry run: the 2 stages are valid" in out
    docs = [d for d in yaml.safe_load_all(out.replace("\n# ", "\n---\n# ")) if d]
    assert len(docs) == 2 and docs[1]["model"]["init_from"] == str(tmp_path / "pipe" / "a")
    assert not (tmp_path / "pipe").exists()  # nothing trained, nothing written


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("stages, needle", [
    ([], "expected a non-empty list of stages"),
    ([{"name": "a"}, {"name": "a"}], "duplicate stage name 'a'"),
    ([{"name": "a", "epochs": 3}], "epochs: unknown stage key"),
    ([{"name": "a", "config": "nowhere.yaml"}], "config: nowhere.yaml: file not found"),
    ([{"name": "train"}], "'train' is a config section name"),
    ([{"name": "a b"}], "expected a folder-safe name"),
    ([{"name": "a"}, {"name": "b", "init": "first"}], "init: got 'first', expected best or last"),
    ([{"name": "a", "init": "best"}], "the first stage has no stage before it"),
    ([{"name": "a"}, {"name": "b", "run": {"out_dir": "x"}}], "run.out_dir: set by the pipeline"),
    ([{"name": "a"}, {"name": "b", "overrides": ["model.init_from=x"]}], "model.init_from: set by the pipeline"),
    ([{"name": "a", "train": {"lr": -1.0}}], "stage a: train.lr: got -1.0"),
    (["a"], "stages[0]: expected a mapping"),
])
def test_bad_stages_are_one_clear_error(pipeline_yaml, stages, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_pipeline(pipeline_yaml(stages))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_overrides_and_top_keys(pipeline_yaml, tmp_path, capsys):
    path = pipeline_yaml()
    with pytest.raises(ConfigError, match="'c' is neither a stage"):
        load_pipeline(path, ["c.train.lr=1"])
    with pytest.raises(ConfigError, match="stage b: train.max_steps: got 0"):
        load_pipeline(path, ["b.train.max_steps=0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": [{"name": "a"}], "epochs": 2}))
    with pytest.raises(ConfigError, match="epochs: unknown top-level key"):
        load_pipeline(bad)
    # one line on stderr from the CLI, exit code 2
    assert cli_main(["train", "-c", str(path), "b.model.init_from=elsewhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.init_from: set by the pipeline" in err[0]
    # a single-run loader given a pipeline says what it is
    with pytest.raises(ConfigError, match="stages: a multi-stage recipe is not one run"):
        load_config(path)


def test_a_stage_config_file_is_relative_to_the_pipeline(tiny_dict, tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    one = tiny_dict("ignored")
    (sub / "one.yaml").write_text(yaml.safe_dump(one, sort_keys=False))
    (sub / "pipe.yaml").write_text(yaml.safe_dump({
        "run": {"out_dir": str(tmp_path / "p")},
        "stages": [{"name": "first", "config": "one.yaml"},
                   {"name": "second", "config": "one.yaml", "overrides": ["train.max_steps=2"]}]}))
    pipe = load_pipeline(sub / "pipe.yaml")
    assert pipe.name == "pipe" and [s.source for s in pipe.stages] == [str(sub / "one.yaml")] * 2
    assert pipe.stages[0].cfg.run.out_dir == str(tmp_path / "p" / "first")  # not the recipe's own out_dir
    assert pipe.stages[0].cfg.train.max_steps == one["train"]["max_steps"]
    assert pipe.stages[1].cfg.train.max_steps == 2


# ----------------------------------------------------------------------------- shipped pipelines
def test_there_are_shipped_pipelines():
    names = {p.name for p in PIPELINES}
    assert {"pipeline-sst2-bert.yaml", "pipeline-spam-gpt.yaml", "pipeline-dpo-scratch.yaml",
            "pipeline-grpo-arithmetic.yaml"} <= names


@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_every_shipped_pipeline_loads_and_validates(path):
    raw = yaml.safe_load(path.read_text())
    pipe = load_pipeline(path)
    assert len(pipe.stages) == len(raw["stages"]) >= 2
    for i, (stage, entry) in enumerate(zip(pipe.stages, raw["stages"])):
        assert stage.source == str(path.parent / entry["config"])  # an existing recipe, referenced
        alone = yaml.safe_load((path.parent / entry["config"]).read_text())  # (its init_from is a stand-in's)
        assert stage.cfg.task == alone["task"] and stage.cfg.train.max_steps == alone["train"]["max_steps"]
        assert stage.cfg.run.out_dir == str(pipe.out_dir / stage.name)
        if i:
            assert stage.cfg.init_from == str(pipe.out_dir / pipe.stages[i - 1].name)
