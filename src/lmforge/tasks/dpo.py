"""``task: dpo``: preference learning (DPO and its family) on prompt/chosen/rejected pairs.

Data: the sources' records in any layout :mod:`lmforge.data.preference_format` reads (Hugging Face
prompt/chosen/rejected with strings or messages, the book's instruction format, HH-RLHF
transcripts), or ``builtin:arithmetic`` (correct vs wrong answers to generated problems, no
download). Prompt and completions are tokenized separately; each step draws pairs through the
step sampler, so resume and gradient accumulation are exact. Validation reports the loss and the
preference metrics (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracy,
logps/chosen, logps/rejected) on held-out pairs.

The model usually starts from an SFT or pretrained run (``model.init_from``), which is also the
reference (see :mod:`lmforge.objectives.dpo`; ``reference: precompute`` is computed once here and cached
in the run folder as ``reference_logps.pt``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from lmforge.chat import render
from lmforge.config import RunConfig
from lmforge.data.builtin_tasks import arithmetic_preference_pairs
from lmforge.data.splits import split_for_data
from lmforge.data.preference_format import PreferencePair, parse_preference_records, render_pair
from lmforge.data.sampler import ExampleBatches, StepSampler
from lmforge.data.sources import SourceSpec, iter_records
from lmforge.errors import ConfigError, DataError, InputError
from lmforge.fsutil import atomic_write
from lmforge.model import count_parameters, flops_per_token
from lmforge.model.lora import has_lora
from lmforge.objectives.dpo import DPO
from lmforge.objectives.logprobs import shared_prompt_rows
from lmforge.objectives.preference_losses import LOSS_TYPES, REFERENCE_FREE
from lmforge.tasks import Task
from lmforge.tasks.common import (TaskContext, TaskParts, build_model, build_tokenizer, epochs_line,
                                  source_specs)
from lmforge.train.logging import Phase

BUILTIN_PAIRS = {"builtin:arithmetic": "correct vs wrong answers to generated arithmetic problems"}


# ------------------------------------------------------------------------------ options
REFERENCES = ("auto", "copy", "precompute", "none")


@dataclass
class DPOOptions:
    """``objective:`` options of ``task: dpo``."""

    loss_type: str = "sigmoid"  # sigmoid (DPO), robust, hinge, ipo, simpo, orpo
    beta: float = 0.1  # strength of the implicit KL to the reference (simpo: reward scale)
    label_smoothing: float = 0.0  # cDPO / robust DPO: assumed rate of flipped labels
    gamma: float = 0.5  # simpo: target reward margin
    average_logps: bool = False  # average completion log-probs per token instead of summing
    reference: str = "auto"  # auto (copy, or none for simpo/orpo), copy, precompute, none
    format: str = "auto"  # record layout: auto, prompt, instruction (the book's), hh (HH-RLHF)
    prompt_field: str = "prompt"  # record field names (renamed to prompt/chosen/rejected)
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    max_length: int | None = None  # prompt + completion tokens (null: the model's context length)
    max_prompt_length: int | None = None  # longer prompts keep their last tokens (null: no limit)
    add_eos: bool = True  # end each completion with the tokenizer's eos (scored too)
    skip_identical: bool = False  # drop pairs whose chosen == rejected instead of failing
    skip_empty: bool = False  # drop pairs with an empty completion instead of failing


def option_problems(o: DPOOptions) -> list[str]:
    """Every bad option, each one line naming its key."""
    p = []
    if o.loss_type not in LOSS_TYPES:
        p.append(f"objective.loss_type: got {o.loss_type!r}, expected one of {', '.join(LOSS_TYPES)}")
    if not o.beta > 0:
        p.append(f"objective.beta: got {o.beta}, expected a number > 0")
    upper_ok = o.label_smoothing < 0.5 if o.loss_type == "robust" else o.label_smoothing <= 0.5
    if not (0 <= o.label_smoothing and upper_ok):
        p.append(f"objective.label_smoothing: got {o.label_smoothing}, expected a number in [0, 0.5"
                 f"{')' if o.loss_type == 'robust' else ']'}")
    if o.label_smoothing and o.loss_type in ("hinge", "ipo", "orpo"):
        p.append(f"objective.label_smoothing: the {o.loss_type} loss has none; expected 0")
    if o.reference not in REFERENCES:
        p.append(f"objective.reference: got {o.reference!r}, expected one of {', '.join(REFERENCES)}")
    elif o.reference == "none" and o.loss_type not in REFERENCE_FREE:
        p.append(f"objective.reference: the {o.loss_type} loss needs a reference; none is only for "
                 f"{' and '.join(REFERENCE_FREE)}")
    if o.max_length is not None and o.max_length < 2:
        p.append(f"objective.max_length: got {o.max_length}, expected an integer >= 2 or null")
    if o.max_prompt_length is not None and o.max_prompt_length < 1:
        p.append(f"objective.max_prompt_length: got {o.max_prompt_length}, expected an integer >= 1 or null")
    if (o.max_length is not None and o.max_prompt_length is not None and o.max_prompt_length >= o.max_length):
        p.append(f"objective.max_prompt_length: {o.max_prompt_length} leaves no room for a completion within "
                 f"max_length {o.max_length}")
    return p


def reference_kind(o: DPOOptions) -> str:
    """``auto`` resolved: no reference for the reference-free losses, else a frozen copy."""
    if o.reference != "auto":
        return "none" if o.loss_type in REFERENCE_FREE else o.reference
    return "none" if o.loss_type in REFERENCE_FREE else "copy"


# ------------------------------------------------------------------------------ pairs -> batches
# The prompt and each completion are tokenized on their own and concatenated (see
# lmforge.objectives.logprobs for why); chosen rows first, then rejected, in one (2B, T) batch.
def _check_ids(ids: Sequence[int], what: str, index: int) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise InputError(f"preference_collate: pair {index}: {what} must be a list of token ids "
                         f"(non-negative integers)")
    return list(ids)


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, add_eos: bool = True
                  ) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the prompt and of each completion, each encoded on its own.

    With ``add_eos`` each completion ends with the tokenizer's eos token, so the model also
    learns (and is scored on) where the answer stops.
    """
    return (tokenizer.encode(prompt), tokenizer.encode(chosen, add_eos=add_eos),
            tokenizer.encode(rejected, add_eos=add_eos))


def preference_collate(pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                       pad_id: int, max_length: int | None = None) -> dict:
    """Stack ``B`` (prompt, chosen, rejected) token-id lists into one right-padded batch.

    Row ``i`` is ``prompt_i + chosen_i`` and row ``B + i`` is ``prompt_i + rejected_i``.
    Returns ``input_ids`` (2B, T), ``attention_mask`` (2B, T) (1 on real tokens),
    ``completion_mask`` (2B, T) (1 on completion tokens only: prompt and padding are 0),
    ``prompt_lengths`` (2B,) and ``truncated`` (how many completions were cut).

    With ``max_length``, a completion that does not fit after its prompt is cut at the end; a
    prompt that leaves no room for one completion token is an error naming the pair.
    """
    if len(pairs) == 0:
        raise InputError("preference_collate: got no pairs; expected at least one")
    prompts, completions = [], []
    for i, pair in enumerate(pairs):
        if len(pair) != 3:
            raise InputError(f"preference_collate: pair {i} has {len(pair)} parts; expected "
                             f"(prompt, chosen, rejected) token-id lists")
        prompt = _check_ids(pair[0], "the prompt", i)
        chosen = _check_ids(pair[1], "the chosen completion", i)
        rejected = _check_ids(pair[2], "the rejected completion", i)
        if not chosen or not rejected:
            which = "chosen" if not chosen else "rejected"
            raise DataError(f"preference_collate: pair {i}: the {which} completion has no tokens")
        if max_length is not None and len(prompt) >= max_length:
            raise InputError(f"preference_collate: pair {i}: the prompt has {len(prompt)} tokens, "
                             f"which leaves no room for a completion within max_length={max_length}")
        prompts.append(prompt)
        completions.append((chosen, rejected))

    rows, prompt_lengths, truncated = [], [], 0
    for side in (0, 1):  # all chosen rows, then all rejected rows
        for prompt, pair in zip(prompts, completions):
            completion = pair[side]
            if max_length is not None and len(prompt) + len(completion) > max_length:
                completion = completion[: max_length - len(prompt)]
                truncated += 1
            rows.append((prompt, completion))
            prompt_lengths.append(len(prompt))

    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)  # (2B, T)
    completion_mask = torch.zeros(len(rows), width, dtype=torch.long)  # (2B, T)
    for r, (prompt, completion) in enumerate(rows):
        n_p, n = len(prompt), len(prompt) + len(completion)
        input_ids[r, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[r, :n] = 1
        completion_mask[r, n_p:n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.long),
        "truncated": truncated,
    }


# ------------------------------------------------------------------------------ records
def source_pairs(spec: SourceSpec, o: DPOOptions, skipped: dict | None = None) -> list[tuple[str, PreferencePair]]:
    """``(where, pair)`` for every usable record of one source; bad records are a one-line
    DataError naming the source and the record index. Records dropped by skip_identical /
    skip_empty are counted into ``skipped`` ({"identical": n, "empty": m})."""
    return _source_pairs(spec, o, skipped)[0]


def _source_pairs(spec: SourceSpec, o: DPOOptions, skipped: dict | None) -> tuple[list[tuple[str, PreferencePair]], int]:
    """The source's usable pairs and how many records it holds (skipped ones included)."""
    if spec.path.startswith("builtin:"):
        if spec.path not in BUILTIN_PAIRS:
            raise DataError(f"{spec.path}: task dpo has no such built-in preference data; expected "
                            f"{', '.join(BUILTIN_PAIRS)}")
        records = arithmetic_preference_pairs(spec.limit or spec.num_docs, spec.seed, **spec.builtin_options())
    else:
        records = []
        for r in iter_records(spec):
            r = {k: v for k, v in r.items() if k != "_where"}
            for field, std in ((o.prompt_field, "prompt"), (o.chosen_field, "chosen"), (o.rejected_field, "rejected")):
                if field != std and field in r:
                    r[std] = r.pop(field)
            records.append(r)
    pairs, dropped = parse_preference_records(records, o.format, spec.path, o.skip_identical, o.skip_empty)
    if skipped is not None:
        for why in dropped.values():
            skipped[why] = skipped.get(why, 0) + 1
    return [(spec.path, p) for p in pairs], len(records)


def read_pairs(specs: list[SourceSpec] | None, o: DPOOptions, skipped: dict | None = None,
               positions: list[int] | None = None) -> list[tuple[str, PreferencePair]]:
    """The pairs of all ``specs``; ``positions`` (if given) receives each pair's record position
    across the sources (skipped records count), and one last entry: the number of records."""
    out, offset = [], 0
    for spec in specs or []:
        pairs, n = _source_pairs(spec, o, skipped)
        out.extend(pairs)
        if positions is not None:
            positions.extend(offset + p.index for _, p in pairs)
        offset += n
    if positions is not None:
        positions.append(offset)
    return out


def split_for_run(cfg: RunConfig) -> dict[str, list[tuple[str, PreferencePair]]]:
    """train/val/test pairs: the sources split by the ``data:`` fractions, unless val/test have
    sources of their own; ``"skipped"``: how many records skip_identical / skip_empty dropped."""
    o, d = cfg.objective, cfg.data
    skipped: dict[str, int] = {}
    positions: list[int] = []
    pairs = read_pairs(source_specs(d.sources), o, skipped, positions)
    # an ordered split cuts by record position, so skipped records do not shift the book's split
    train, val, test = split_for_data(pairs, d, cfg.run.seed, positions=positions[:-1], total=positions[-1])
    if d.val_sources:
        val = read_pairs(source_specs(d.val_sources), o, skipped)
    if d.test_sources:
        test = read_pairs(source_specs(d.test_sources), o, skipped)
    if not train:
        raise DataError("task dpo: no training pairs left after the validation/test split")
    return {"train": train, "val": val, "test": test, "skipped": skipped}


# ------------------------------------------------------------------------------ tokens
def model_template(tokenizer):
    """Message prompts (HH-RLHF, chat records) rendered with the model's own chat template."""
    def render_messages(messages, add_generation_prompt: bool = False) -> str:
        return render(messages, tokenizer, add_generation_prompt=add_generation_prompt)
    return render_messages


class EncodedPairs:
    """Token ids (prompt, chosen, rejected) of one split's pairs, and what was cut to fit."""

    def __init__(self, pairs, tokenizer, o: DPOOptions, max_length: int, context_note: str):
        self.ids: list[tuple[list[int], list[int], list[int]]] = []
        self.prompts_cut = 0
        in_template = model_template(tokenizer)
        for where, pair in pairs:
            prompt, chosen, rejected = render_pair(pair, in_template)
            p, c, r = tokenize_pair(tokenizer, prompt, chosen, rejected, add_eos=o.add_eos)
            if o.max_prompt_length is not None and len(p) > o.max_prompt_length:
                p = p[-o.max_prompt_length:]  # keep the end: the question sits next to the answer
                self.prompts_cut += 1
            if len(p) >= max_length:
                raise DataError(f"{where}: record {pair.index}: the prompt has {len(p)} tokens, which leaves no "
                                f"room for a completion within {context_note}; expected a shorter prompt (or set "
                                f"objective.max_prompt_length)")
            self.ids.append((p, c, r))
        self.completions_cut = sum(len(p) + max(len(c), len(r)) > max_length for p, c, r in self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def collate(enc: EncodedPairs, indices: list[int], pad: int, max_length: int, split: str) -> dict:
    b = preference_collate([enc.ids[i] for i in indices], pad, max_length)
    b.pop("truncated")
    B = len(indices)  # the model runs each prompt once, its chosen and rejected packed after it
    b.update(shared_prompt_rows(b["input_ids"], b["completion_mask"], [[i, B + i] for i in range(B)], pad))
    b["pair_index"] = torch.tensor(indices, dtype=torch.long)  # (B,) rows of a precomputed reference
    b["split"] = split
    return b


def fixed_batches(enc: EncodedPairs, batch_size: int, pad: int, max_length: int, split: str,
                  by_length: bool = False):
    """A callable giving the same batches of ``enc`` each time: in file order, or (``by_length``)
    longest pairs first, so that pairs of similar length share a batch and little is padding
    (scoring many pairs of very different lengths; each batch carries its pairs' indices)."""
    order = list(range(len(enc)))
    if by_length:
        order.sort(key=lambda i: -(len(enc.ids[i][0]) + max(len(enc.ids[i][1]), len(enc.ids[i][2]))))

    def batches():
        for s in range(0, len(order), batch_size):
            yield collate(enc, order[s:s + batch_size], pad, max_length, split)
    return batches


# ------------------------------------------------------------------------------ builder
def reference_note(kind: str, model) -> str:
    """How the reference will be computed, in words (a LoRA model's copy is its adapters-off base)."""
    if kind == "copy" and has_lora(model):
        return "the model with its LoRA adapters switched off (no copy)"
    return {"copy": "a frozen copy of the starting model", "precompute": "log-probs precomputed once, cached",
            "none": "none (reference-free loss)"}.get(kind, kind)



def _texts(splits):
    def texts():
        for _, pair in splits["train"]:
            prompt, chosen, rejected = render_pair(pair)
            yield prompt + chosen
            yield rejected
    return texts


def _build(ctx: TaskContext) -> TaskParts:
    cfg, o, t, dist = ctx.cfg, ctx.cfg.objective, ctx.cfg.train, ctx.dist
    splits = split_for_run(cfg)
    skipped = splits.pop("skipped")
    if not splits["val"]:
        raise ConfigError("data.val_fraction: the validation split is empty; raise val_fraction or give val_sources")
    tokenizer = build_tokenizer(ctx, _texts(splits))
    model = build_model(ctx, tokenizer.vocab_size)
    mcfg = model.config
    if mcfg.arch not in ("decoder",):
        raise ConfigError(f"task: dpo trains a causal decoder; model.arch is {mcfg.arch!r}")
    max_length = o.max_length or mcfg.context_length
    if max_length > mcfg.context_length:
        raise ConfigError(f"objective.max_length: {max_length} is longer than the model's context_length "
                          f"{mcfg.context_length}")
    note = (f"objective.max_length {o.max_length}" if o.max_length else f"the model's context_length {max_length}")
    enc = {s: EncodedPairs(p, tokenizer, o, max_length, note) for s, p in splits.items() if p}
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    eb = t.eval_batch_size
    batches = {s: fixed_batches(e, eb, pad, max_length, s) for s, e in enc.items()}
    tables = {s: {"size": len(e), "batches": batches[s]} for s, e in enc.items()}
    objective = DPO(o.loss_type, o.beta, o.label_smoothing, o.gamma, o.average_logps, reference_kind(o),
                    precompute=lambda obj, m, device: precompute_reference(obj, m, device, tables,
                                                                           ctx.run_dir / "reference_logps.pt"))
    train = enc["train"]
    sampler = StepSampler(len(train), t.batch_size, t.grad_accum, dist.world_size, cfg.run.seed)
    train_data = ExampleBatches(sampler, lambda idx: collate(train, idx, pad, max_length, "train"), dist.rank)
    fpt = flops_per_token(mcfg, max_length) * (4 / 3 if objective.kind == "copy" else 1)  # + reference forward

    def finish(best_model, summary: dict) -> dict:
        if not dist.is_main:
            return {}
        device = next(best_model.parameters()).device
        reports = {}
        for split in ("val", "test"):
            if split in enc:
                phase = Phase(f"{split} evaluation of the best model", len(enc[split]), ctx.say, unit="pairs")
                sized = phase.track(batches[split](), size=lambda b: len(b["pair_index"]))
                reports[split] = objective.evaluate(best_model, ({k: v.to(device) if torch.is_tensor(v) else v
                                                                  for k, v in b.items()} for b in sized))
                reports[split]["pairs"] = len(enc[split])
                ctx.say(f"{split}: " + "  ".join(f"{k} {v:.4f}" for k, v in reports[split].items() if k != "pairs"))
        text = json.dumps(reports, indent=2)
        atomic_write(ctx.run_dir / "eval_report.json", lambda p: p.write_text(text))
        return {"eval_report": reports}

    counts = ", ".join(f"{s} {len(e)}" for s, e in enc.items())
    cut = ", ".join(f"{s}: {e.prompts_cut} prompts, {e.completions_cut} completions" for s, e in enc.items()
                    if e.prompts_cut or e.completions_cut)
    steps_per_epoch = len(train) / sampler.global_batch
    return TaskParts(
        model=model, tokenizer=tokenizer, objective=objective, train_data=train_data, eval_data=batches["val"],
        flops_per_token=fpt, finish=finish,
        describe=[f"data: {counts} preference pairs; max_length {max_length}; cut to fit: {cut or 'none'}; "
                  f"skipped records: " + (", ".join(f"{n} {why}" for why, n in skipped.items()) or "none"),
                  f"model: {mcfg.arch} {count_parameters(model):,} parameters; loss {o.loss_type} beta {o.beta}; "
                  f"reference: {reference_note(objective.kind, model)}",
                  f"batch: {t.batch_size} x {t.grad_accum} accum x {dist.world_size} procs = {sampler.global_batch} "
                  f"pairs/step ({epochs_line(ctx, steps_per_epoch)}) on {dist.device}"])


@torch.no_grad()
def precompute_reference(objective: DPO, model, device, batches: dict, path: Path | None = None
                         ) -> dict[str, torch.Tensor]:
    """Reference log-probs of every pair of every split, ``{split: (N, 2)}``, in eval mode.

    Read from ``path`` when it holds a cache for the same splits and sizes (a resumed run must
    not score the pairs with the trained model), else computed with ``model`` and saved there.
    """
    sizes = {s: b["size"] for s, b in batches.items()}
    if path is not None and Path(path).is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if {s: int(t.shape[0]) for s, t in saved.items()} == sizes:
            return saved
    was_training = model.training
    model.eval()
    out = {}
    for split, spec in batches.items():
        table = torch.zeros(spec["size"], 2)
        for batch in spec["batches"]():
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            lp = objective._pair_logps(model, batch)
            idx = batch["pair_index"].cpu()
            table[idx, 0], table[idx, 1] = lp.chosen.cpu(), lp.rejected.cpu()
        out[split] = table
    model.train(was_training)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), lambda p: torch.save(out, p))
    return out


def _check(cfg: RunConfig) -> list[str]:
    o = cfg.objective
    p = option_problems(o)
    if not cfg.init_from:
        mcfg = cfg.model_config(vocab_size=cfg.model.get("vocab_size") or 1)
        if mcfg.arch != "decoder":
            p.append(f"model.arch: task dpo trains a causal decoder; got {mcfg.arch!r}")
        if o.max_length is not None and o.max_length > mcfg.context_length:
            p.append(f"objective.max_length: {o.max_length} is longer than model.context_length {mcfg.context_length}")
    return p


DPO_TASK = Task("dpo", "preference learning (DPO, IPO, cDPO/robust, hinge, SimPO, ORPO) on chosen/rejected pairs",
                DPOOptions, _build, _check)
