"""Multi-stage recipes: ``pretrain -> sft -> dpo`` as one command, one run folder, one report.

A recipe with a top-level ``stages:`` list is a pipeline of ordinary runs::

    run: {name: pipeline-sst2-bert, out_dir: runs/pipeline-sst2-bert}   # the top folder
    train: {resume: auto}              # optional sections: applied to every stage
    stages:
      - name: mlm
        config: sst2-bert-mlm.yaml     # a recipe file, relative to this file
      - name: classify
        config: sst2-bert.yaml
        init: best                     # best (default) or last checkpoint of the stage before
        overrides: [train.max_steps=600]
        train: {lr: 1.0e-4}            # inline sections work too (with or without config:)

Each stage is a :class:`~lmforge.config.RunConfig` built, lowest first, from its ``config:``
file, the pipeline's top-level sections, its inline sections, its ``overrides:``, then the
command line's overrides (``train.max_steps=5`` for every stage, ``classify.train.max_steps=5``
for one). The pipeline sets ``run.out_dir`` (``<out_dir>/<stage name>``), ``run.name`` and, after
the first stage, ``model.init_from``: the previous stage's run folder (its best checkpoint, else
its newest) or, with ``init: last``, its final checkpoint.

:func:`run_pipeline` calls the one run function (:func:`lmforge.tasks.run.run`) per stage. A
finished stage leaves ``stage_done.json`` (written atomically, with its summary) and is skipped
on the next invocation, so an interrupted pipeline resumes stage by stage: the stage that was
cut off continues from its checkpoint (``train.resume: auto``). A stage that follows one trained
in this invocation starts fresh (its older checkpoints came from other weights and are set
aside). At the end ``pipeline.json`` and ``report.html`` in the top folder collect every stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmforge.config import RunConfig, merge, parse_overrides, read_yaml
from lmforge.errors import ConfigError
from lmforge.fsutil import atomic_write
from lmforge.tasks import config_from_dict
from lmforge.tasks.run import folder_lock, run
from lmforge.train.checkpoint import step_name


__all__ = ["Stage", "Pipeline", "is_pipeline", "load_pipeline", "run_pipeline", "format_plan",
           "DONE_FILE", "SUMMARY_FILE"]

SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))  # task, run, model, ...
STAGE_KEYS = ("name", "config", "init", "overrides")
INIT_CHOICES = ("best", "last")
DONE_FILE = "stage_done.json"
SUMMARY_FILE = "pipeline.json"
REPORT_FILE = "report.html"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_PIPELINE_RUN_KEYS = ("name", "out_dir")  # run.* keys that belong to the pipeline, not to a stage


@dataclass
class Stage:
    name: str
    index: int
    source: str  # the recipe file it came from, or "inline"
    init: str  # best | last: which checkpoint of the stage before it starts from
    cfg: RunConfig

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.run.out_dir)


@dataclass
class Pipeline:
    name: str
    out_dir: Path
    path: Path
    stages: list[Stage]


# ------------------------------------------------------------------------------------ loading
def is_pipeline(path: str | os.PathLike) -> bool:
    """True when the recipe at ``path`` has a top-level ``stages:`` key."""
    return "stages" in read_yaml(path)


def load_pipeline(path: str | os.PathLike, overrides: list[str] | None = None) -> Pipeline:
    """Read, resolve and validate every stage of the multi-stage recipe at ``path``; every
    problem is a :class:`ConfigError` naming the stage and key."""
    path = Path(path)
    data = read_yaml(path)
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: stages: got {stages!r}, expected a non-empty list of stages "
                          f"(each with name: and config: or inline sections)")
    unknown = [k for k in data if k != "stages" and k not in SECTIONS]
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown top-level key in a multi-stage recipe (expected stages "
                          f"and sections applied to every stage: {', '.join(SECTIONS)})")
    names = _stage_names(path, stages)
    common = {k: v for k, v in data.items() if k != "stages"}
    top_run = dict(common.pop("run", None) or {})
    if not isinstance(top_run, dict):
        raise ConfigError(f"{path}: run: expected a mapping (name, out_dir, and run keys for every stage)")
    every, per_stage = _split_overrides(overrides or [], names)
    for key in _PIPELINE_RUN_KEYS:  # run.name / run.out_dir on the command line: the pipeline's
        if key in every.get("run", {}):
            top_run[key] = every["run"].pop(key)
    name = str(top_run.pop("name", None) or path.stem)
    out_dir = Path(str(top_run.pop("out_dir", None) or f"runs/{name}"))
    if top_run:  # run.seed / run.device at the top apply to every stage
        common["run"] = top_run
    built: list[Stage] = []
    for i, entry in enumerate(stages):
        built.append(_build_stage(path, i, entry, names[i], common, every, per_stage.get(names[i], {}),
                                  name, out_dir, built[-1] if built else None))
    return Pipeline(name=name, out_dir=out_dir, path=path, stages=built)


def _stage_names(path: Path, stages: list) -> list[str]:
    names: list[str] = []
    for i, entry in enumerate(stages):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: stages[{i}]: expected a mapping with name: and config: or sections, "
                              f"got {type(entry).__name__}")
        n = entry.get("name")
        if not isinstance(n, str) or not _NAME.match(n):
            raise ConfigError(f"{path}: stages[{i}].name: got {n!r}, expected a folder-safe name "
                              f"(letters, digits, - and _)")
        if n in SECTIONS:
            raise ConfigError(f"{path}: stages[{i}].name: {n!r} is a config section name; expected another name "
                              f"(so that {n}.key=value overrides stay unambiguous)")
        if n in names:
            raise ConfigError(f"{path}: stages[{i}].name: duplicate stage name {n!r}; expected unique names")
        names.append(n)
    return names


def _split_overrides(overrides: list[str], names: list[str]) -> tuple[dict, dict[str, dict]]:
    """Command-line overrides -> (for every stage, {stage name: for that stage})."""
    every: list[str] = []
    per: dict[str, list[str]] = {}
    for item in overrides:
        head = item.split("=", 1)[0].strip().split(".", 1)[0]
        if head in names:
            rest = item.split(".", 1)[1] if "." in item.split("=", 1)[0] else ""
            if not rest or "=" not in rest:
                raise ConfigError(f"override {item!r}: expected {head}.section.key=value")
            per.setdefault(head, []).append(rest)
        elif head in SECTIONS:
            every.append(item)
        else:
            raise ConfigError(f"override {item!r}: {head!r} is neither a stage ({', '.join(names)}) nor a section "
                              f"({', '.join(SECTIONS)})")
    return parse_overrides(every), {k: parse_overrides(v) for k, v in per.items()}


def _build_stage(path: Path, i: int, entry: dict, name: str, common: dict, every: dict, mine: dict,
                 pipeline_name: str, out_dir: Path, prev: Stage | None) -> Stage:
    where = f"{path}: stage {name}"
    bad = [k for k in entry if k not in STAGE_KEYS and k not in SECTIONS]
    if bad:
        raise ConfigError(f"{where}: {bad[0]}: unknown stage key (expected {', '.join(STAGE_KEYS)} or a section: "
                          f"{', '.join(SECTIONS)})")
    base: dict = {}
    source = "inline"
    if entry.get("config") is not None:
        ref = entry["config"]
        if not isinstance(ref, str) or not ref.strip():
            raise ConfigError(f"{where}: config: got {ref!r}, expected a recipe file path (relative to {path.name})")
        file = (path.parent / ref) if not Path(ref).is_absolute() else Path(ref)
        if not file.is_file():
            raise ConfigError(f"{where}: config: {ref}: file not found (looked for {file})")
        base = read_yaml(file)
        if "stages" in base:
            raise ConfigError(f"{where}: config: {ref} is itself a multi-stage recipe; expected a single-run recipe")
        source = str(file)
    init = entry.get("init", "best")
    if init not in INIT_CHOICES:
        raise ConfigError(f"{where}: init: got {init!r}, expected {' or '.join(INIT_CHOICES)}")
    if prev is None and "init" in entry:
        raise ConfigError(f"{where}: init: the first stage has no stage before it; set model.init_from instead")
    raw = entry.get("overrides") or []
    raw = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list) or not all(isinstance(o, str) for o in raw):
        raise ConfigError(f"{where}: overrides: expected a list of section.key=value strings")
    inline = {k: v for k, v in entry.items() if k in SECTIONS}
    own = merge(merge(inline, parse_overrides(raw)), mine)  # what this stage itself sets
    if "out_dir" in (own.get("run") or {}):
        raise ConfigError(f"{where}: run.out_dir: set by the pipeline ({out_dir / name}); set run.out_dir at the "
                          f"top of the pipeline instead")
    if prev is not None and any("init_from" in (part.get("model") or {}) for part in (own, common, every)):
        raise ConfigError(f"{where}: model.init_from: set by the pipeline (the stage before's checkpoint); "
                          f"choose it with init: {' or '.join(INIT_CHOICES)}")
    d = merge(merge(merge(base, common), own), every)
    d = merge(d, mine)  # a stage's own command-line override beats one for every stage
    d = merge(d, {"run": {"out_dir": str(out_dir / name), "name": f"{pipeline_name}/{name}"}})
    pending: tuple[str, ...] = ()
    if prev is not None:
        init_from = _init_path(prev, init)
        d = merge(d, {"model": {"init_from": init_from}})
        pending = (init_from,)
    try:
        cfg = config_from_dict(d, pending_paths=pending)
    except ConfigError as e:
        raise ConfigError([f"stage {name}: {p}" for p in e.problems]) from None
    return Stage(name=name, index=i, source=source, init=init, cfg=cfg)


def _init_path(prev: Stage, init: str) -> str:
    """The previous stage's run folder (lmforge resolves it to its best checkpoint, else its
    newest), or its final checkpoint (``step_<max_steps>``)."""
    if init == "best":
        return str(prev.out_dir)

    return str(prev.out_dir / "checkpoints" / step_name(prev.cfg.train.max_steps))


# ------------------------------------------------------------------------------------ showing
def format_plan(pipe: Pipeline, with_configs: bool = True) -> str:
    """Every stage's resolved config (as YAML), each headed by one ``#`` line."""
    import yaml

    out = [f"# multi-stage recipe {pipe.name}: {' -> '.join(s.name for s in pipe.stages)} in {pipe.out_dir}/"]
    for s in pipe.stages:
        start = f", starting from {s.cfg.init_from}" if s.cfg.init_from else ""
        out.append(f"# stage {s.index + 1}/{len(pipe.stages)}: {s.name} (task {s.cfg.task}, from {s.source}{start})")
        if with_configs:
            out.append(yaml.safe_dump(s.cfg.to_dict(), sort_keys=False).rstrip("\n"))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ running
def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _config_hash(cfg: RunConfig) -> str:
    text = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_done(stage: Stage) -> dict | None:
    path = stage.out_dir / DONE_FILE
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a damaged marker: the stage runs (and resumes from its checkpoints)
    return done if isinstance(done, dict) and done.get("stage") == stage.name else None


def _brief(summary: dict) -> dict:
    """A stage summary without its per-step history (the run folder's metrics.jsonl has it)."""
    return json.loads(json.dumps({k: v for k, v in summary.items() if k != "history"}, default=str))


def _write_done(stage: Stage, summary: dict) -> None:
    record = {"stage": stage.name, "index": stage.index, "task": stage.cfg.task, "source": stage.source,
              "init_from": stage.cfg.init_from, "config_sha256": _config_hash(stage.cfg),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": _brief(summary)}
    atomic_write(stage.out_dir / DONE_FILE, json.dumps(record, indent=2) + "\n")


def run_pipeline(pipe: Pipeline, *, progress: bool = True, print_fn: Callable = print,
                 stage_callbacks: dict[str, list] | None = None) -> dict:
    """Run every stage not finished earlier, in order, through :func:`lmforge.tasks.run.run`.

    Returns ``{"stages": {name: summary}, "ran": [...], "skipped": [...], "stopped_early",
    "stage" (the last stage that ran or stopped), "steps", "report"}`` plus the last stage's
    ``reports`` (classification results) when it has them. ``stage_callbacks`` gives extra
    trainer callbacks to named stages (tests stop a stage half-way with it). The pipeline's folder
    is locked while it runs: a second run of it is refused at once.
    """
    with folder_lock(pipe.out_dir):
        return _run_pipeline(pipe, progress, print_fn, stage_callbacks)


def _run_pipeline(pipe: Pipeline, progress: bool, print_fn: Callable, stage_callbacks: dict[str, list] | None) -> dict:
    say = print_fn if _is_main() else (lambda *a, **k: None)
    summaries: dict[str, dict] = {}
    ran: list[str] = []
    skipped: list[str] = []
    fresh = False  # an earlier stage trained in this invocation: later stages start over
    n = len(pipe.stages)
    last: dict = {}
    for s in pipe.stages:
        head = f"stage {s.index + 1}/{n} {s.name}"
        done = None if fresh else _read_done(s)
        if done is not None:
            summaries[s.name] = done.get("summary") or {}
            skipped.append(s.name)
            changed = done.get("config_sha256") != _config_hash(s.cfg)
            say(f"{head}: done earlier ({summaries[s.name].get('steps')} steps, {done.get('finished')}); skipping "
                f"(delete {s.out_dir / DONE_FILE} to run it again)"
                + ("; note: its config has changed since" if changed else ""))
            continue
        if s.index > 0 and s.init == "last":  # the final checkpoint the stage before recorded
            recorded = (summaries.get(pipe.stages[s.index - 1].name) or {}).get("last_checkpoint")
            if recorded and recorded != s.cfg.init_from:
                s.cfg.model["init_from"] = recorded
        if fresh and str(s.cfg.train.resume).lower() == "auto":
            s.cfg.train.resume = "never"  # its old checkpoints grew from other weights; run() sets them aside
        if _is_main():
            (s.out_dir / DONE_FILE).unlink(missing_ok=True)
        start = f" from {s.cfg.init_from}" if s.cfg.init_from else ""
        say(f"{head}: task {s.cfg.task}{start} -> {s.out_dir}")
        summary = run(s.cfg, progress=progress, print_fn=print_fn,
                      callbacks=list((stage_callbacks or {}).get(s.name, [])))
        summaries[s.name] = _brief(summary)
        last = summary
        ran.append(s.name)
        if summary.get("stopped_early"):
            say(f"{head}: stopped at step {summary.get('steps')}; the same command resumes it "
                f"(finished stages are skipped)")
            break
        if _is_main():
            _write_done(s, summary)
        fresh = True
    stopped = bool(last.get("stopped_early"))
    result = {"pipeline": pipe.name, "out_dir": str(pipe.out_dir), "stages": summaries, "ran": ran,
              "skipped": skipped, "stopped_early": stopped, "stage": (ran or skipped)[-1],
              "steps": (last or summaries[pipe.stages[-1].name]).get("steps")}
    if last.get("reports") and not stopped:
        result["reports"] = last["reports"]
    if _is_main():
        result["report"] = str(write_pipeline_report(pipe, summaries, stopped))
        say(f"pipeline report: {result['report']}")
    if not stopped and not ran:
        say(f"all {n} stages were done earlier; nothing to train")
    return result


# ------------------------------------------------------------------------------------ report
def write_pipeline_report(pipe: Pipeline, summaries: dict[str, dict], stopped: bool = False) -> Path:
    """``pipeline.json`` (the plan and every stage's summary) and ``report.html`` (a table of the
    stages linking each stage's own report and curves) in the top folder; returns the HTML path."""
    rows = []
    for s in pipe.stages:
        sm = summaries.get(s.name)
        status = "not run" if sm is None else "stopped" if sm.get("stopped_early") else "done"
        rows.append({"name": s.name, "task": s.cfg.task, "source": s.source, "init": s.init if s.index else None,
                     "init_from": s.cfg.init_from, "out_dir": str(s.out_dir), "status": status, "summary": sm})
    record = {"pipeline": pipe.name, "recipe": str(pipe.path), "out_dir": str(pipe.out_dir),
              "written": time.strftime("%Y-%m-%d %H:%M:%S"), "stopped_early": stopped, "stages": rows}
    atomic_write(pipe.out_dir / SUMMARY_FILE, json.dumps(record, indent=2, default=str) + "\n")
    return atomic_write(pipe.out_dir / REPORT_FILE, _html(pipe, rows))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape("" if v is None else str(v))


def _html(pipe: Pipeline, rows: list[dict]) -> str:
    e = html.escape
    parts = [f"<h1>pipeline report: {e(pipe.name)}</h1>",
             f"<p>{e(str(pipe.path))} &middot; {' &rarr; '.join(e(r['name']) for r in rows)} &middot; written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
             "<table><tr><th>stage</th><th>task</th><th>status</th><th>steps</th><th>starts from</th>"
             "<th>final evaluation</th><th>report</th></tr>"]
    for r in rows:
        sm = r["summary"] or {}
        ev = sm.get("final_eval") or {}
        evals = ", ".join(f"{k} {_fmt(v)}" for k, v in ev.items() if k != "step")
        link = f'<a href="{e(r["name"])}/report.html">report</a>' \
            if (Path(r["out_dir"]) / "report.html").is_file() else ""
        parts.append(f"<tr><td>{e(r['name'])}</td><td>{e(r['task'])}</td><td>{e(r['status'])}</td>"
                     f"<td>{_fmt(sm.get('steps'))}</td><td><code>{_fmt(r['init_from'])}</code></td>"
                     f"<td>{e(evals)}</td><td>{link}</td></tr>")
    parts.append("</table>")
    for r in rows:
        curves = Path(r["out_dir"]) / "training_curves.png"
        if curves.is_file():
            parts.append(f'<h2>{e(r["name"])}</h2><img src="{e(r["name"])}/training_curves.png" '
                         f'alt="{e(r["name"])} training curves">')
    style = ("body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; } "
             "table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ccc; "
             "padding: 3px 8px; } img { max-width: 100%; }")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(pipe.name)} pipeline</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
