"""``lmforge <verb>``: one table of verbs, each a plain function of parsed arguments.

Errors on bad input (any :class:`~lmforge.errors.LMForgeError`) print one line to stderr and exit
with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable


# ----------------------------------------------------------------------------------- verbs
def cmd_pretrain(args) -> int:
    from lmforge.config import load_config
    from lmforge.train.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    summary = pretrain(cfg, progress=not args.quiet)
    if summary.get("stopped_early"):
        print(f"stopped at step {summary['steps']}; resume with the same command (train.resume=auto)")
    return 0


def cmd_eval(args) -> int:
    from lmforge import from_pretrained
    from lmforge.data.sources import SourceSpec
    from lmforge.data.tokens import TokenStore, sequential_windows
    from lmforge.errors import CheckpointError
    from lmforge.objectives import CausalLM

    model, tok = from_pretrained(args.model, device=args.device, with_tokenizer=True)
    if tok is None:
        raise CheckpointError(f"{args.model}: no tokenizer.json beside the weights; eval needs the model's tokenizer")
    spec = SourceSpec(path=args.data, text_field=args.text_field, limit=args.limit, split=args.split,
                      doc_separator=args.doc_separator)
    store = TokenStore.build([spec], tok, args.cache_dir, val_fraction=0.0, progress=not args.quiet)
    context = args.context or model.config.context_length
    objective = CausalLM()
    dev = next(model.parameters()).device

    def batches():
        for x, y in sequential_windows(store.train, context, args.batch_size, max_batches=args.max_batches,
                                       split_name=args.data):
            yield {"input_ids": x.to(dev), "targets": y.to(dev)}

    m = objective.evaluate(model, batches())
    print(json.dumps({"model": str(args.model), "data": args.data, "tokens": int(len(store.train)), **m}))
    return 0


def cmd_generate(args) -> int:
    from lmforge import from_pretrained
    from lmforge.errors import CheckpointError
    from lmforge.generate import stream_text

    model, tok = from_pretrained(args.model, device=args.device, with_tokenizer=True)
    if tok is None:
        raise CheckpointError(f"{args.model}: no tokenizer.json beside the weights; generate needs the model's tokenizer")
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=list(args.stop or []))
    prompt = args.prompt
    if args.chat:  # the prompt is one user turn in the model's chat template
        from lmforge.chat import render

        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.prompt}]
        prompt = render(messages, tok, add_generation_prompt=True)
    else:
        sys.stdout.write(args.prompt)
    for piece in stream_text(model, tok, prompt, **opts):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from lmforge import from_pretrained
    from lmforge.chat_session import ChatSession, run_chat
    from lmforge.errors import CheckpointError

    model, tok = from_pretrained(args.model, device=args.device, with_tokenizer=True)
    if tok is None:
        raise CheckpointError(f"{args.model}: no tokenizer.json beside the weights; chat needs the model's tokenizer")
    session = ChatSession(model, tok, system=args.system, context=args.context, temperature=args.temperature,
                          top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
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
    if target in PRESETS:
        import torch

        with torch.device("meta"):
            model = build(ModelConfig.from_preset(target))
    elif path.suffix in (".yaml", ".yml"):
        import torch

        from lmforge.config import load_config

        cfg = load_config(path)
        mc = cfg.model_config(vocab_size=cfg.model.get("vocab_size") or cfg.tokenizer.vocab_size)
        with torch.device("meta"):
            model = build(mc)
    elif path.exists():
        from lmforge import from_pretrained

        model = from_pretrained(path)
    else:
        from lmforge.errors import ConfigError

        raise ConfigError(f"{target}: not a preset ({', '.join(sorted(PRESETS))}), a YAML recipe or a model folder")
    s = summary(model)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    c = s["config"]
    print(f"{target}: {c['arch']} model{' (preset ' + c['name'] + ')' if c.get('name') else ''}")
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
        files = [Path(f) for f in args.input]
        tok = train_tokenizer(args.kind, files, vocab_size=args.vocab_size)
        tok.save(args.out)
        print(f"wrote {args.out}: {tok.kind} tokenizer, {tok.vocab_size} tokens, specials {list(tok.special_tokens)}")
    else:
        tok = load_tokenizer(args.tokenizer)
        ids = tok.encode(args.text)
        print(json.dumps({"ids": ids, "tokens": [tok.id_to_token(i) for i in ids], "decoded": tok.decode(ids)}))
    return 0


def cmd_export(args) -> int:
    from lmforge import from_pretrained
    from lmforge.interop.hf import export_hf

    model, tok = from_pretrained(args.model, with_tokenizer=True)
    export_hf(model, args.out, tokenizer=tok)
    print(f"wrote {args.out} (Hugging Face format)")
    return 0


# ----------------------------------------------------------------------------------- table
def _pretrain_args(p):
    p.add_argument("--config", "-c", required=True, help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=500 model.n_layer=6")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _eval_args(p):
    p.add_argument("--model", required=True, help="checkpoint or model folder")
    p.add_argument("--data", required=True, help="text/JSONL/CSV/Parquet file, folder, glob, builtin:NAME or hf:NAME")
    p.add_argument("--text-field", default="text")
    p.add_argument("--split", default="train")
    p.add_argument("--doc-separator", default=None)
    p.add_argument("--limit", type=int, default=None, help="at most this many documents")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's)")
    p.add_argument("--cache-dir", default=".lmforge_cache")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")


def _generate_args(p):
    p.add_argument("--model", required=True, help="checkpoint, model folder or Hugging Face folder")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user turn in the model's chat template")
    p.add_argument("--system", default=None, help="with --chat: a system prompt")
    p.add_argument("--device", default="cpu")


def _chat_args(p):
    p.add_argument("--model", required=True, help="a .gguf file, checkpoint, model folder or Hugging Face folder")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-tokens", type=int, default=256, help="longest answer")
    p.add_argument("--context", type=int, default=None, help="token budget of the conversation (default: the model's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")


def _info_args(p):
    p.add_argument("target", help="a model/checkpoint folder, a Hugging Face folder, a preset name or a YAML recipe")
    p.add_argument("--json", action="store_true")


def _tokenizer_args(p):
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True, help="text files")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--kind", default="bpe", choices=["bpe", "char", "byte"])
    t.add_argument("--out", required=True, help="output tokenizer JSON file")
    e = sub.add_parser("encode", help="show the tokens of a text")
    e.add_argument("--tokenizer", required=True)
    e.add_argument("--text", required=True)


def _export_args(p):
    p.add_argument("--model", required=True)
    p.add_argument("--format", default="hf", choices=["hf"])
    p.add_argument("--out", required=True)


# verb -> (function, argument builder, one-line help)
VERBS: dict[str, tuple[Callable, Callable, str]] = {
    "pretrain": (cmd_pretrain, _pretrain_args, "train a language model from a YAML recipe"),
    "eval": (cmd_eval, _eval_args, "loss and perplexity of a model on a data source"),
    "generate": (cmd_generate, _generate_args, "generate text from a model (streams to the terminal)"),
    "chat": (cmd_chat, _chat_args, "chat with a model in the terminal (its chat template, streamed answers)"),
    "info": (cmd_info, _info_args, "config, parameter count and FLOPs/token of a model"),
    "tokenizer": (cmd_tokenizer, _tokenizer_args, "train a tokenizer or inspect an encoding"),
    "export": (cmd_export, _export_args, "export a decoder to Hugging Face format"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Build, train and inspect transformer LMs.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (fn, add_args, help_) in VERBS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lmforge.errors import LMForgeError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LMForgeError as e:
        print(f"lmforge {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"lmforge {args.verb}: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lmforge info gpt2 | head`: the reader left, nothing is wrong
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
