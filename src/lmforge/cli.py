"""``lmforge <verb>``: one table of verbs, each a plain function of parsed arguments.

Errors on bad input (any :class:`~lmforge.errors.LMForgeError`) print one line to stderr and exit
with code 2, without a traceback.

Each verb imports what it uses inside its function: ``lmforge --help`` and a mistyped command
answer at once, without loading torch and the model code a verb needs (the one place, with the
inspect parser, where lmforge imports inside functions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable


# ----------------------------------------------------------------------------------- verbs
def cmd_train(args) -> int:
    from lmforge.tasks import load_config
    from lmforge.tasks.run import run
    from lmforge.tasks.pipeline import is_pipeline

    if is_pipeline(args.config):
        return _train_stages(args)
    cfg = load_config(args.config, args.overrides)
    if args.print_config or args.dry_run:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        if args.dry_run:
            from lmforge.tasks import get_task

            print(f"# dry run: the config is valid; task {cfg.task} ({get_task(cfg.task).summary}); nothing was trained")
        if args.dry_run or args.print_config == "exit":
            return 0
    summary = run(cfg, progress=not args.quiet)
    if summary.get("stopped_early"):
        how = "the same command" + ("" if cfg.train.resume == "auto" else " plus train.resume=auto")
        print(f"stopped at step {summary['steps']}; resume with {how}")
    for split, r in (summary.get("reports") or {}).items():
        print(json.dumps({"split": split, "accuracy": round(r["accuracy"], 4), "macro_f1": round(r["macro_f1"], 4),
                          "examples": r["examples"]}))
    return 0


def _train_stages(args) -> int:
    """A multi-stage recipe (top-level ``stages:``): every stage in turn, in one run folder."""
    from lmforge.tasks.pipeline import format_plan, load_pipeline, run_pipeline

    pipe = load_pipeline(args.config, args.overrides)
    if args.print_config or args.dry_run:
        print(format_plan(pipe), end="")
        if args.dry_run:
            print(f"# dry run: the {len(pipe.stages)} stages are valid; nothing was trained")
        if args.dry_run or args.print_config == "exit":
            return 0
    summary = run_pipeline(pipe, progress=not args.quiet)
    if summary["stopped_early"]:
        print(f"stopped at step {summary['steps']} of stage {summary['stage']}; resume with the same command")
    for split, r in (summary.get("reports") or {}).items():
        print(json.dumps({"split": split, "accuracy": round(r["accuracy"], 4), "macro_f1": round(r["macro_f1"], 4),
                          "examples": r["examples"]}))
    return 0


def _load_for_inference(path: str, device: str, quantize: str = "none", verb: str | None = None):
    """Model, tokenizer and the run config it was trained with ({} for other folders), from any
    name ``lmforge.store`` resolves; ``verb`` names who needs the tokenizer."""
    from lmforge.store import load_for_inference

    model, tok, run_config, _ = load_for_inference(path, device, quantize=quantize, need_tokenizer=verb)
    return model, tok, run_config


def _positive(name: str, value) -> None:
    from lmforge.errors import InputError

    if value is not None and value < 1:
        raise InputError(f"{name}: got {value}, expected a positive integer")


def cmd_eval(args) -> int:
    from lmforge.errors import InputError
    from lmforge.numbers import metrics_json
    from lmforge.tasks import EvalRequest, evaluate

    for name in ("context", "max_batches", "batch_size", "limit"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.harness is not None:
        return _eval_harness(args)
    if args.data is None:
        raise InputError("eval: give --data SOURCE (or --harness TASKS for lm-evaluation-harness tasks)")
    model, tok, run_config = _load_for_inference(args.model, args.device, verb="eval")
    request = EvalRequest(data=args.data, text_field=args.text_field, label_field=args.label_field,
                          columns=args.columns.split(",") if args.columns else None, limit=args.limit,
                          split=args.split, doc_separator=args.doc_separator, cache_dir=args.cache_dir,
                          context=args.context, batch_size=args.batch_size, max_batches=args.max_batches,
                          progress=not args.quiet)
    metrics = evaluate(model, tok, run_config, request)
    print(metrics_json({"model": str(args.model), "data": args.data, **metrics}))
    return 0


def _eval_harness(args) -> int:
    """``lmforge eval --harness TASKS``: lm-evaluation-harness tasks on the model (lmforge.harness)."""
    from lmforge.errors import InputError
    from lmforge.numbers import metrics_json

    try:
        from lmforge.harness import evaluate_harness, task_metrics, write_results
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        raise InputError("eval --harness needs lm-evaluation-harness; pip install 'lmforge[harness]'") from None

    model, tok, _ = _load_for_inference(args.model, args.device, verb="eval --harness")
    results = evaluate_harness(model, tok, args.harness.split(","), limit=args.limit, num_fewshot=args.num_fewshot,
                               batch_size=args.batch_size, include_path=args.include_path)
    if args.output:
        write_results(results, args.output)
    print(metrics_json({"model": str(args.model), "harness": args.harness, **task_metrics(results)}))
    return 0


def cmd_classify(args) -> int:
    from lmforge.errors import InputError
    from lmforge.tasks.classify import classify_texts, saved_options

    if (not args.text) == (args.input is None):
        raise InputError("classify: give --text TEXT (repeatable) or --input FILE (one text per line; - for stdin), "
                         "not both or neither")
    texts = list(args.text) if args.text else _read_lines(args.input)  # before loading the model
    if args.max_length is not None and args.max_length < 2:  # before loading anything; 0 is not "the default"
        raise InputError(f"--max-length: got {args.max_length}, expected an integer >= 2 (tokens per text, "
                         f"special tokens included), or leave it out for the training max_length")
    model, tok, run_config = _load_for_inference(args.model, args.device, verb="classify")
    if not model.config.num_classes:
        raise InputError(f"{args.model}: this model has no classification head (model.num_classes is 0); "
                         f"train one with task: classify")
    max_length = args.max_length if args.max_length is not None else saved_options(run_config).max_length
    for text, r in zip(texts, classify_texts(model, tok, texts, max_length)):
        print(json.dumps({"text": text, **r}, ensure_ascii=False))
    return 0


def _read_lines(source: str) -> list[str]:
    """The non-blank lines of a UTF-8 file, or of standard input for ``-``."""
    from lmforge.errors import InputError

    name = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: not valid UTF-8 text (byte {e.start})") from None
    texts = [t for t in text.splitlines() if t.strip()]
    if not texts:
        raise InputError(f"{name}: no text lines; expected one text per line")
    return texts


def _require_chat_template(tok, model_name) -> None:
    """A model whose tokenizer has no chat template and no chat tokens cannot chat: say so."""
    from lmforge.errors import InputError

    if getattr(tok, "chat_template", None) or any(tok.token_to_id(t) is not None for t in ("<|user|>", "<|im_start|>")):
        return
    raise InputError(f"{model_name}: its tokenizer has no chat template and no chat tokens (<|user|>, <|im_start|>), "
                     f"so it was not trained to chat; use lmforge generate --prompt TEXT to continue text")


def cmd_generate(args) -> int:
    from lmforge.generate import stream_text

    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=list(args.stop or []), context_overflow=args.context_overflow)
    _check_sampling_flags(opts)  # before loading anything
    if args.system is not None and not args.chat:
        from lmforge.errors import InputError

        raise InputError("--system needs --chat (a system prompt is part of the chat template); add --chat, "
                         "or write the instructions into the prompt")
    model, tok, _ = _load_for_inference(args.model, args.device, args.quantize, verb="generate")
    prompt = args.prompt
    if args.chat:  # the prompt is one user turn in the model's chat template
        from lmforge.chat import render

        _require_chat_template(tok, args.model)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.prompt}]
        prompt = render(messages, tok, add_generation_prompt=True)
    pieces = stream_text(model, tok, prompt, **opts)  # checks prompt, options and context first
    if not args.chat:
        sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _check_sampling_flags(opts: dict) -> None:
    """The sampling options, validated, with errors naming the flags (--top-p, not sampling.top_p)."""
    import re

    from lmforge.errors import ConfigError
    from lmforge.generate import SamplingConfig

    try:
        SamplingConfig(**opts)
    except ConfigError as e:
        raise ConfigError(re.sub(r"sampling\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"),
                                 str(e))) from None


def cmd_chat(args) -> int:
    from lmforge.chat_session import ChatSession, run_chat

    _positive("--top-k", args.top_k)
    model, tok, _ = _load_for_inference(args.model, args.device, args.quantize, verb="chat")
    _require_chat_template(tok, args.model)
    session = ChatSession(model, tok, system=args.system, context=args.context, temperature=args.temperature,
                          top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed, top_k=args.top_k)
    for name in ("temperature", "top_p", "max_tokens"):  # checked like the interactive commands
        said = session.command(f"/{name} {getattr(args, name)}")
        if not said.startswith("["):
            from lmforge.errors import ConfigError

            raise ConfigError(f"--{name.replace('_', '-')}: {said.split(': ', 1)[1]}")
    return run_chat(session)


def cmd_info(args) -> int:
    from lmforge.model import ModelConfig, PRESETS, build, summary

    target = args.target
    path = Path(target)
    trained = None
    if target in PRESETS:
        import torch

        with torch.device("meta"):
            model = build(ModelConfig.from_preset(target))
    elif path.suffix in (".yaml", ".yml"):
        import torch

        from lmforge.tasks import load_config

        cfg = load_config(path)
        mc = cfg.model_config(vocab_size=cfg.model.get("vocab_size") or cfg.tokenizer.vocab_size)
        with torch.device("meta"):
            model = build(mc)
    elif path.exists() or target.startswith("hf:"):  # hf:ORG/NAME: its folder in the Hugging Face cache
        from lmforge.store import checkpoint_facts, from_pretrained, resolve_model_path

        path, note = resolve_model_path(target)
        if note:
            print(note, file=sys.stderr)
        model = from_pretrained(path)
        trained = checkpoint_facts(path)
    else:
        from lmforge.errors import ConfigError

        raise ConfigError(f"{target}: not a preset ({', '.join(sorted(PRESETS))}), a YAML recipe or a model folder")
    s = summary(model)
    if trained:
        s["checkpoint"] = trained
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    c = s["config"]
    print(f"{target}: {c['arch']} model{' (preset ' + c['name'] + ')' if c.get('name') else ''}")
    if trained:
        own = ", ".join(f"{k} {v:.4g}" for k, v in trained["metrics"].items())
        print(f"  checkpoint            {path}: step {trained['step']}{f' ({own})' if own else ''}")
        if "best" in trained:
            print(f"  best of the run       {trained['best_metric']} {trained['best']:.4g} at step "
                  f"{trained['best_step']} ({path.parent / 'best'})")
    print(f"  parameters            {s['parameters']:,}")
    print(f"  without embeddings    {s['non_embedding_parameters']:,}")
    print(f"  FLOPs/token (train)   {s['flops_per_token_train']:,.0f}   (6N + 12·L·C·T at T={c['context_length']})")
    print(f"  FLOPs/token (forward) {s['flops_per_token_forward']:,.0f}")
    print("  config:")
    for k, v in c.items():
        print(f"    {k}: {v}")
    return 0


def cmd_tokenizer(args) -> int:
    from lmforge.tokenizer import load_tokenizer, train_tokenizer

    if args.action == "train":
        from lmforge.data.catalog import local_path

        files = [local_path(f) for f in args.input]  # catalog:NAME is its file
        _check_output_file(Path(args.out))
        tok = train_tokenizer(args.kind, files, vocab_size=args.vocab_size)
        tok.save(args.out)
        print(f"wrote {args.out}: {tok.kind} tokenizer, {tok.vocab_size} tokens, specials {list(tok.special_tokens)}")
    else:
        tok = load_tokenizer(args.tokenizer)
        ids = tok.encode(args.text)
        print(json.dumps({"ids": ids, "tokens": [tok.id_to_token(i) for i in ids], "decoded": tok.decode(ids)}))
    return 0


def _check_output_file(out: Path) -> None:
    """``out`` can be written: not a folder, and no file where a folder above it should be."""
    from lmforge.errors import InputError

    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; expected a file path such as {out / 'tokenizer.json'}")
    for p in out.parents:
        if p.exists() and not p.is_dir():
            raise InputError(f"--out {out}: {p} is a file, not a folder")


def cmd_export(args) -> int:
    from lmforge.interop.hf_export import export_model

    if args.format == "gguf":
        return _export_gguf(args)
    if args.dtype is not None:
        from lmforge.errors import InputError

        raise InputError(f"--dtype {args.dtype}: applies to --format gguf; {args.format} export keeps the weights' dtype")
    out = Path(args.out)
    for p in (out, *out.parents):  # checked before loading the model
        if p.exists() and not p.is_dir():
            from lmforge.errors import InputError

            raise InputError(f"--out {out}: {p} is a file; expected a folder (new or existing) to write into")
    model, tok, run_config = _load_for_inference(args.model, "cpu")
    base = ((run_config or {}).get("model") or {}).get("init_from")  # what a PEFT adapter sits on
    said = export_model(model, out, tokenizer=tok, fmt=args.format, merge=args.merge, base=base)
    from lmforge.integrity import write_checksums

    write_checksums(out, ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                          "adapter_config.json", "adapter_model.safetensors"))  # checked when lmforge loads it
    print(f"wrote {out} ({said})")
    return 0


def _export_gguf(args) -> int:
    """``export --format gguf``: one llama.cpp file (weights in --dtype, tokenizer, chat template)."""
    from lmforge.errors import InputError
    from lmforge.interop.gguf_export import DTYPES, export_gguf

    dtype = args.dtype or "f32"
    if dtype not in DTYPES:
        raise InputError(f"--dtype: got {dtype!r}, expected one of {', '.join(DTYPES)}")
    out = Path(args.out)
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; expected a .gguf file path")
    model, tok, _ = _load_for_inference(args.model, "cpu")
    if args.merge:
        from lmforge.model.lora import has_lora, merge_lora

        model = merge_lora(model) if has_lora(model) else model
    export_gguf(model, out, tokenizer=tok, dtype=dtype)
    print(f"wrote {out} (GGUF, {dtype}{', tokenizer and chat template' if tok is not None else ''})")
    return 0


def cmd_presets(args) -> int:
    from lmforge.model import PRESETS, ModelConfig

    rows = [(name, _preset_line(ModelConfig.from_preset(name))) for name in PRESETS]
    folder = Path(args.configs) if args.configs else _default_configs()
    recipes = _recipes(folder)
    if args.json:
        print(json.dumps({"presets": dict(rows), "recipes": {str(p): d for p, d in recipes}}, indent=2))
        return 0
    print("model presets (model.preset in a recipe, lmforge info NAME for details):")
    for name, line in rows:
        print(f"  {name:<13} {line}")
    print(f"recipes ({folder}/; lmforge pretrain --config FILE):")
    if not recipes:
        print("  (none found)")
    for path, desc in recipes:
        print(f"  {path.name:<30} {desc}")
    return 0


def _default_configs() -> Path:
    """``./configs`` when there is one, else the recipes beside the sources (an editable install)."""
    here = Path("configs")
    return here if here.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def _preset_line(c) -> str:
    from lmforge.model import build, count_parameters
    import torch

    with torch.device("meta"):
        n = count_parameters(build(c))
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
    if c.arch == "bigram":
        return f"bigram table, {size} parameters"
    style = {"learned": "GPT-2 style", "rope": "Llama style", "none": "no positions"}[c.positional]
    if c.arch == "encoder":
        style = "BERT style encoder"
    heads = f"{c.n_head} heads" + (f" / {c.n_kv_head} KV heads" if c.n_kv_head != c.n_head else "")
    return (f"{style}: {c.n_layer} layers, {heads}, width {c.n_embd}, context {c.context_length}, "
            f"vocab {c.vocab_size}, {size} parameters")


def _recipes(folder: Path) -> list[tuple[Path, str]]:
    """Each ``*.yaml`` under ``folder`` with the first sentence of its leading ``#`` comment."""
    import re

    out = []
    for p in sorted(folder.glob("*.y*ml")):
        words = []
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.startswith("#"):
                break
            words.append(line.lstrip("#").strip())
        text = " ".join(w for w in words if w)
        m = re.match(r"(.+?[.!?])(?=\s+[A-Z(]|$)", text)
        out.append((p, (m.group(1) if m else text) or "(no description: start the file with a # comment)"))
    return out


def cmd_data(args) -> int:
    from lmforge.data.catalog import run_cli

    return run_cli(args)


def cmd_download(args) -> int:
    """Fetch models (hf:ORG/NAME[@REV]) and datasets (catalog:NAME) ahead of use; print their paths."""
    from lmforge.data import catalog
    from lmforge.hub import resolve_hf_model

    for name in args.names:
        is_data = name.startswith(catalog.PREFIX)
        print(catalog.resolve(name) if is_data else resolve_hf_model(name, progress=not args.quiet))
    return 0


def cmd_inspect(args) -> int:
    from lmforge.inspect.cli import run_inspect

    return run_inspect(args)


def cmd_report(args) -> int:
    from lmforge.inspect.cli import run_report

    return run_report(args)


def cmd_serve(args) -> int:
    from lmforge.serve.command import run_serve

    return run_serve(args)


def cmd_judge(args) -> int:
    from lmforge.serve.command import run_judge

    return run_judge(args)


# ----------------------------------------------------------------------------------- table
def _train_args(p):
    import argparse

    from lmforge.tasks import TASKS, get_task

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("config sections (each key documented beside its field in src/lmforge/config.py; model keys in "
                "src/lmforge/model/config.py; objective keys are the task's options):\n"
                "  task, run, model, tokenizer, data, objective, train, logging, sample\n"
                "tasks:\n" + "\n".join(f"  {name:<9} {get_task(name).summary}" for name in TASKS))
    p.add_argument("--config", "-c", required=True, help="YAML recipe (see configs/); its task: picks what is trained "
                   "(a recipe with stages: runs each stage in turn)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=500 model.n_layer=6 "
                   "(multi-stage recipes: for every stage, or STAGE.train.max_steps=500 for one)")
    p.add_argument("--print-config", nargs="?", const="run", default=None, choices=["run", "exit"],
                   help="print the resolved config first (--print-config exit: print it and stop)")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved, train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _eval_args(p):
    p.add_argument("--model", required=True, help="checkpoint, model folder or run folder (its best checkpoint)")
    p.add_argument("--data", default=None, help="text/JSONL/CSV/Parquet file, folder, glob, builtin:NAME or hf:NAME")
    p.add_argument("--harness", default=None, metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated, "
                                                                    "instead of --data (pip install 'lmforge[harness]')")
    p.add_argument("--num-fewshot", type=int, default=None, help="--harness: few-shot examples per prompt")
    p.add_argument("--include-path", default=None, help="--harness: a folder of task YAML files")
    p.add_argument("--output", default=None, help="--harness: write the harness's full results here (JSON)")
    p.add_argument("--text-field", default=None, help="record field with the text (default: text, or the "
                                                      "classifier's training field)")
    p.add_argument("--label-field", default=None, help="classifiers: record field with the label (default: the "
                                                       "training field)")
    p.add_argument("--columns", default=None, help="classifiers: column names of a CSV/TSV without a header, "
                                                   "comma-separated (default: the training source's)")
    p.add_argument("--split", default="train")
    p.add_argument("--doc-separator", default=None)
    p.add_argument("--limit", type=int, default=None, help="at most this many documents")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's)")
    p.add_argument("--cache-dir", default=".lmforge_cache")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")


def _classify_args(p):
    p.add_argument("--model", required=True, help="a classifier checkpoint or run folder (its best checkpoint)")
    p.add_argument("--text", action="append", default=None, help="a text to classify (repeatable: one line of "
                                                                    "output per text)")
    p.add_argument("--input", default=None, help="a UTF-8 file with one text per line (- reads standard input)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the training max_length)")
    p.add_argument("--device", default="cpu")


def _generate_args(p):
    p.add_argument("--model", required=True, help="checkpoint, model folder, run folder (its best checkpoint) "
                                                  "or Hugging Face folder")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=200,
                   help="longest continuation, in tokens (--max-tokens is the same, as in chat)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--context-overflow", default="crop", choices=["crop", "error"],
                   help="past the model's context: keep the last context_length tokens (crop, the default; "
                        "RoPE models slide) or refuse the request (error)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user turn in the model's chat template")
    p.add_argument("--system", default=None, help="with --chat: a system prompt")
    _quantize_arg(p)


def _quantize_arg(p):
    p.add_argument("--quantize", default="none", choices=["none", "fp16", "int8", "int4"],
                   help="linear weights in fewer bytes for faster decoding: none (fp32, oneDNN-packed on a "
                        "CPU), fp16 (half the bytes, same greedy text in our checks), int8 or int4 (8- or "
                        "4-bit weights in groups of 32, fp32 activations; a GGUF file's Q8_0/Q4_0/Q4_1 "
                        "blocks load as they are)")


def _chat_args(p):
    p.add_argument("--model", required=True, help="a .gguf file, checkpoint, model folder or Hugging Face folder")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=256,
                   help="longest answer, in tokens (--max-new-tokens is the same, as in generate)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--context", type=int, default=None, help="token budget of the conversation (default: the model's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    _quantize_arg(p)


def _info_args(p):
    p.add_argument("target", help="a model/checkpoint folder, a Hugging Face folder, a preset name or a YAML recipe")
    p.add_argument("--json", action="store_true")


def _tokenizer_args(p):
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True, help="text files or catalog:NAME datasets")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--kind", default="bpe", choices=["bpe", "char", "byte"])
    t.add_argument("--out", required=True, help="output tokenizer JSON file")
    e = sub.add_parser("encode", help="show the tokens of a text")
    e.add_argument("--tokenizer", required=True)
    e.add_argument("--text", required=True)


def _presets_args(p):
    p.add_argument("--configs", default=None, help="folder of recipes to list (default: ./configs, else the "
                                                   "repository's configs/)")
    p.add_argument("--json", action="store_true")


def _export_args(p):
    p.add_argument("--model", required=True, help="checkpoint, model folder or run folder (its best checkpoint)")
    p.add_argument("--format", default="hf", choices=["hf", "peft", "gguf"],
                   help="hf: a Hugging Face model folder (classifiers as *ForSequenceClassification); peft: a LoRA "
                        "model's adapter alone, for peft.PeftModel on its base; gguf: one llama.cpp file")
    p.add_argument("--merge", action="store_true", help="--format hf or gguf of a LoRA model: fold the adapters "
                                                        "into the weights (W += alpha/r B A)")
    p.add_argument("--dtype", default=None, help="--format gguf weights: f32 (default), f16 or q8_0")
    p.add_argument("--out", required=True)


def _data_args(p):
    from lmforge.data.catalog import add_cli_args

    add_cli_args(p)


def _download_args(p):
    p.add_argument("names", nargs="+", help="hf:ORG/NAME[@REVISION] models and/or catalog:NAME datasets")
    p.add_argument("--quiet", action="store_true", help="no progress bar for models")


def _inspect_args(p):
    from lmforge.inspect.cli import add_inspect_args

    add_inspect_args(p)


def _report_args(p):
    from lmforge.inspect.cli import add_report_args

    add_report_args(p)


def _serve_args(p):
    from lmforge.serve.command import add_serve_args

    add_serve_args(p)


def _judge_args(p):
    from lmforge.serve.command import add_judge_args

    add_judge_args(p)


# verb -> (function, argument builder, one-line help)
VERBS: dict[str, tuple[Callable, Callable, str]] = {
    "train": (cmd_train, _train_args, "train any task (pretrain, mlm, classify, ...) from a YAML recipe"),
    "pretrain": (cmd_train, _train_args, "alias of train"),
    "eval": (cmd_eval, _eval_args, "a model's metrics on a data source (LM: loss/ppl; classifier: accuracy, F1)"),
    "classify": (cmd_classify, _classify_args, "label texts with a classifier, with class probabilities"),
    "generate": (cmd_generate, _generate_args, "generate text from a model (streams to the terminal)"),
    "chat": (cmd_chat, _chat_args, "chat with a model in the terminal (its chat template, streamed answers)"),
    "info": (cmd_info, _info_args, "config, parameter count and FLOPs/token of a model"),
    "tokenizer": (cmd_tokenizer, _tokenizer_args, "train a tokenizer or inspect an encoding"),
    "export": (cmd_export, _export_args, "export to Hugging Face (decoders, classifiers, LoRA merged), PEFT or GGUF"),
    "presets": (cmd_presets, _presets_args, "list the model presets and the shipped recipes, one line each"),
    "inspect": (cmd_inspect, _inspect_args, "look inside a model: attention, weights, logit lens, per-token loss"),
    "report": (cmd_report, _report_args, "write report.html of a run folder (curves, evals, samples, plots)"),
    "data": (cmd_data, _data_args, "the named public datasets (catalog:NAME): list them, or print a file's path"),
    "download": (cmd_download, _download_args, "fetch hf:ORG/NAME models and catalog:NAME datasets ahead of use"),
    "serve": (cmd_serve, _serve_args, "serve a model over HTTP with the OpenAI API (continuous batching, chat page)"),
    "judge": (cmd_judge, _judge_args, "score answers from 0 to 100 with a judge model behind an OpenAI API endpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    from lmforge.version import __version__

    parser = argparse.ArgumentParser(prog="lmforge", description="Build, train and inspect transformer LMs.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (fn, add_args, help_) in VERBS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb; Ctrl-C at any point (start-up included) exits 130 with one line, no traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return _interrupted()


def _interrupted() -> int:
    """Ctrl-C: one line, exit code 130; a second Ctrl-C while exiting is ignored (it would end the
    interpreter with a traceback of whatever shutdown code it lands in)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("interrupted", file=sys.stderr)
    return 130


def _main(argv: list[str] | None) -> int:
    from lmforge.errors import LMForgeError

    from lmforge.cli_args import normalize_override_args

    words = list(sys.argv[1:] if argv is None else argv)
    try:  # --train.max_steps=5 as well as train.max_steps=5, in any position
        words = normalize_override_args(words) if words and words[0] in ("train", "pretrain") else words
    except LMForgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(words)
    if extra:  # overrides written after options (``-c x.yaml --quiet train.lr=1e-3``) are still overrides
        if getattr(args, "overrides", None) is None or any(w.startswith("-") for w in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    code = _run_verb(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave_worker(code)
    return code


def _leave_worker(code: int) -> None:
    """A torchrun worker ends here, skipping the interpreter's teardown: after its process group
    is destroyed and every file is written, gloo's C++ side could still abort the exiting process
    ("terminate called without an active exception", SIGABRT) in about 1 run in 15 on this
    2-core machine, failing a run that had finished. Nothing is left to flush but stdout/stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_verb(args) -> int:
    """The verb's exit code: 0, or 2 with one line on stderr for bad input."""
    from lmforge.errors import LMForgeError

    try:
        return args.func(args)
    except LMForgeError as e:
        print(f"lmforge {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `lmforge info gpt2 | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        import errno

        if isinstance(e, PermissionError) or e.errno == errno.EROFS:  # a read-only place
            where = Path(e.filename) if e.filename else None
            if where is not None and where.name.startswith(".") and where.name.endswith(".tmp"):
                where = where.parent  # an atomic write's temporary file: name the folder
            print(f"lmforge {args.verb}: error: {where or ''}: {e.strerror or e}; check its permissions or "
                  f"choose a place you can write to", file=sys.stderr)
            return 2
        if isinstance(e, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
            print(f"lmforge {args.verb}: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        return _interrupted()


def run() -> None:
    """The console entry point (``lmforge``, ``python -m lmforge.cli``): :func:`main`, then exit with
    its code. An interrupted run leaves through ``os._exit(130)``: when Ctrl-C lands inside code an
    extension evaluates while importing (torch at start-up), CPython marks the interrupt as
    unhandled even though :func:`main` caught it, and would re-raise SIGINT at exit."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    run()
