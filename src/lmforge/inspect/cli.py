"""``lmforge inspect attention|weights|lens|tokens`` and ``lmforge report``: argument builders and
the functions they run. ``lmforge.cli`` holds only the table entries that point here.

``lmforge.cli`` imports this module to build its parser, so the tools and the model loader are
imported inside the functions that run them: the CLI's start-up stays light.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge.errors import InputError


# ------------------------------------------------------------------------------------ helpers

def _load(path, device: str, need_tokenizer: str | None = None):
    """(model, tokenizer) from any name ``lmforge.store`` knows (a run folder: its best checkpoint)."""
    from lmforge.store import load_for_inference

    model, tok, _, _ = load_for_inference(path, device, need_tokenizer=need_tokenizer)
    return model, tok

def _text(args) -> str:
    if args.text is not None and args.file is not None:
        raise InputError("give --text or --file, not both")
    if args.file is not None:
        return Path(args.file).read_text(encoding="utf-8")
    if args.text is None:
        raise InputError("no text: give --text \"...\" or --file PATH")
    return args.text


def _out(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _short(path) -> str:
    """The last two parts of a path ('checkpoints/step_00000300'), for plot titles."""
    return "/".join(Path(path).parts[-2:])


def _wrote(paths) -> None:
    for p in paths:
        print(f"wrote {p}")


# ---------------------------------------------------------------------------------- sub-verbs
def inspect_attention(args) -> int:
    from lmforge.inspect.attention_maps import (attention, attention_html, head_patterns, plot_attention_grid,
                                                plot_attention_layer)
    from lmforge.inspect.common import parse_indices

    model, tok = _load(args.model, args.device, need_tokenizer="inspect")
    maps = attention(model, tok, _text(args), parse_indices(args.layers), parse_indices(args.heads))
    T = len(maps.ids)
    if T > args.window or args.start:
        maps = maps.window(args.start, args.window)
        print(f"the text has {T} tokens: the plots show tokens {maps.offset}..{maps.offset + len(maps.ids) - 1} "
              f"(move with --start, widen with --window)")
    print("layer head   self  prev  first  dist  induction   (mean attention per query; see head_patterns)")
    for r in head_patterns(maps):
        ind = "   -" if r["induction"] is None else f"{r['induction']:.2f}"
        print(f"{r['layer']:5d} {r['head']:4d}  {r['self']:.2f}  {r['previous']:.2f}  {r['first']:.2f}  "
              f"{r['distance']:4.1f}  {ind}")
    out = _out(args)
    paths = [plot_attention_grid(maps, out / "attention.png")]
    paths += [plot_attention_layer(maps, layer, out / f"attention_layer{layer}.png") for layer in maps.layers]
    paths.append(attention_html(maps, out / "attention.html"))
    _wrote(paths)
    return 0


def inspect_weights(args) -> int:
    from lmforge import inspect as I
    from lmforge.inspect.weights import write_json

    model, _ = _load(args.model, args.device)
    out = _out(args)
    records = I.weight_stats(model)
    paths = [write_json(records, out / "weights.json"), I.plot_weight_stats(records, out / "weights_stats.png"),
             I.plot_weight_histograms(model, out / "weights_hist.png")]
    print(f"{'matrix':44s} {'shape':>13s} {'spectral':>9s} {'frobenius':>9s} {'eff.rank':>8s}")
    for r in records:
        shape = "x".join(str(s) for s in r["shape"])
        print(f"{r['name']:44s} {shape:>13s} {r['spectral_norm']:9.3f} {r['frobenius_norm']:9.3f} "
              f"{r['effective_rank']:8.1f}")
    if args.against:
        other, _ = _load(args.against, args.device)
        change = I.compare_weights(model, other)
        paths += [write_json(change, out / "weights_change.json"),
                  I.plot_weight_change(change, out / "weights_change.png",
                                       title=f"relative change: {_short(args.model)} -> {_short(args.against)}")]
        top = sorted(change, key=lambda r: -r["rel_change"])[:5]
        print("moved most: " + ", ".join(f"{r['name']} {r['rel_change']:.3g}" for r in top))
    _wrote(paths)
    return 0


def inspect_lens(args) -> int:
    from lmforge.inspect.lens import logit_lens, plot_lens, plot_top_tokens
    from lmforge.inspect.weights import write_json

    model, tok = _load(args.model, args.device, need_tokenizer="inspect")
    lens = logit_lens(model, tok, _text(args), k=args.top_k, window=args.window)
    if len(lens.positions) < (lens.total - 1 if model.config.arch == "decoder" else lens.total):
        print(f"the text has {lens.total} tokens: showing the last {len(lens.positions)} positions (--window)")
    out = _out(args)
    paths = [plot_lens(lens, out / "lens.png", metric=args.metric),
             plot_top_tokens(lens, out / f"lens_top{args.top_k}.png", position=args.position),
             write_json(lens.to_json(), out / "lens.json")]
    j = args.position % len(lens.positions)
    print(f"position {lens.positions[j]} ('{lens.tokens[j]}' -> target '{lens.targets[j]}'):")
    for r, row in enumerate(lens.rows):
        tops = "  ".join(f"{t!r} {float(p):.2f}" for t, p in zip(lens.top_tokens[r][j], lens.top_probs[r, j]))
        print(f"  {row:>9s}  target p={float(lens.target_prob[r, j]):.3f} rank {int(lens.target_rank[r, j]) + 1:<5d} {tops}")
    _wrote(paths)
    return 0


def inspect_tokens(args) -> int:
    from lmforge.inspect.tokens import chat_ids, prompt_response_ids, to_terminal, token_html, token_losses
    from lmforge.inspect.weights import write_json

    model, tok = _load(args.model, args.device, need_tokenizer="inspect")
    if args.messages:
        if args.prompt is not None or args.text is not None or args.file is not None:
            raise InputError("--messages stands alone: do not combine it with --prompt, --text or --file")
        try:
            messages = json.loads(Path(args.messages).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{args.messages}: not valid JSON ({e.msg}); expected a list of "
                             "{\"role\", \"content\"} messages") from None
        if isinstance(messages, dict) and "messages" in messages:
            messages = messages["messages"]
        if not isinstance(messages, list):
            raise InputError(f"{args.messages}: expected a JSON list of {{\"role\", \"content\"}} messages")
        ids, trains = chat_ids(tok, messages)
        tl = token_losses(model, tok, ids=ids, trains=trains)
    elif args.prompt is not None:
        ids, trains = prompt_response_ids(tok, args.prompt, _text(args))
        tl = token_losses(model, tok, ids=ids, trains=trains)
    else:
        tl = token_losses(model, tok, _text(args))
    color = not args.no_color and sys.stdout.isatty()
    print(to_terminal(tl, color=color))
    out = _out(args)
    _wrote([token_html(tl, out / "tokens.html"), write_json(tl.to_json(), out / "tokens.json")])
    return 0


SUBVERBS = {"attention": inspect_attention, "weights": inspect_weights, "lens": inspect_lens, "tokens": inspect_tokens}


def run_inspect(args) -> int:
    return SUBVERBS[args.what](args)


def add_inspect_args(p) -> None:
    sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")

    def common(q, text: bool = True, out: str = "runs/inspect"):
        q.add_argument("--model", required=True, help="model folder, checkpoint, Hugging Face folder or run folder")
        q.add_argument("--out", default=out, help=f"output folder (default: {out})")
        q.add_argument("--device", default="cpu")
        if text:
            q.add_argument("--text", default=None, help="the text to look at")
            q.add_argument("--file", default=None, help="read the text from this file")

    a = sub.add_parser("attention", help="attention maps per layer and head (PNG grid, per-layer PNGs, HTML)")
    common(a)
    a.add_argument("--layers", default=None, help="e.g. '0,2' or '0-3' (default: all)")
    a.add_argument("--heads", default=None, help="e.g. '1,3' (default: all)")
    a.add_argument("--start", type=int, default=0, help="first token of the window shown")
    a.add_argument("--window", type=int, default=64, help="tokens shown per axis (default 64)")
    w = sub.add_parser("weights", help="weight histograms, spectral/Frobenius norms, effective rank (PNG + JSON)")
    common(w, text=False)
    w.add_argument("--against", default=None, help="a second checkpoint: plot the per-layer relative change")
    lens = sub.add_parser("lens", help="logit lens: each layer's prediction (PNG heatmap, top-k table, JSON)")
    common(lens)
    lens.add_argument("--metric", default="prob", choices=["prob", "rank"], help="heatmap of the target's prob or rank")
    lens.add_argument("--top-k", type=int, default=5)
    lens.add_argument("--position", type=int, default=-1, help="position of the top-k table (default: the last)")
    lens.add_argument("--window", type=int, default=64, help="positions shown (the last ones)")
    t = sub.add_parser("tokens", help="per-token loss (terminal colours + HTML), optionally with the loss mask")
    common(t)
    t.add_argument("--prompt", default=None, help="a prompt before the text: its tokens are shown as not training")
    t.add_argument("--messages", default=None, help="JSON file of chat messages: only assistant turns train")
    t.add_argument("--no-color", action="store_true", help="plain 'token[loss]' output")


# ------------------------------------------------------------------------------------- report
def run_report(args) -> int:
    from lmforge.inspect.report import write_report

    path = write_report(args.run_dir, args.out, text=args.text, with_model=not args.no_model)
    print(f"wrote {path}")
    return 0


def add_report_args(p) -> None:
    p.add_argument("run_dir", help="a run folder (metrics.jsonl, config.yaml, checkpoints/)")
    p.add_argument("--out", default=None, help="output file (default: RUN_DIR/report.html)")
    p.add_argument("--text", default=None, help="text for the attention plots (default: from the run's data)")
    p.add_argument("--no-model", action="store_true", help="leave out the checkpoint's attention and weight plots")
