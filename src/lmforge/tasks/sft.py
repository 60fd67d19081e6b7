"""``task: sft``: instruction tuning / chat fine-tuning of a decoder.

Records (Alpaca instruction/input/output, the book's instruction-data.json, chat ``messages``,
OpenAssistant trees) become prompt + response token sequences (``lmforge.data.sft_format``);
the loss covers the response tokens only (every assistant turn of a conversation) unless
``train_on_prompt``. Validation reports loss and perplexity on response tokens, and at each
evaluation the model's greedy answers to a fixed set of validation prompts are appended to
``sft_samples.jsonl`` in the run folder (a person reads them).

``objective.packing`` packs each micro-batch's examples into fewer rows of at most ``max_length``
tokens (greedy first-fit, in the sampler's order, so a step's batch stays a pure function of the
step). Every example is shifted on its own before packing (its inputs ``ids[:-1]``, its targets
``labels[1:]``), so no target crosses into the next example; positions restart at 0 per example
and ``segment_ids`` give the model a block-diagonal causal mask. The targets of a micro-batch are
the same as unpacked, so the loss (a mean over targets, weighted by target counts) is unchanged.
Validation batches are not packed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from lmforge.chat import render
from lmforge.config import RunConfig
from lmforge.data.sampler import ExampleBatches, StepSampler
from lmforge.data.sft_format import IGNORE, alpaca_messages, build_examples, oasst_paths, prompt_response
from lmforge.data.sources import read_records
from lmforge.data.splits import split_for_data
from lmforge.errors import ConfigError, DataError
from lmforge.generate import generate_text
from lmforge.model import count_parameters, flops_per_token
from lmforge.model.packed import release_packed
from lmforge.objectives import CausalLM
from lmforge.tasks import Task
from lmforge.tasks.common import (TaskContext, TaskParts, build_model, build_tokenizer, epochs_line,
                                  source_specs)
from lmforge.train.callbacks import Callback
from lmforge.train.logging import Phase


@dataclass
class SFTOptions:
    """``objective:`` options of ``task: sft``."""

    format: str = "alpaca"  # alpaca (instruction/input/output), messages (chat records), oasst (trees)
    template: str = "alpaca"  # alpaca or book (Alpaca records), chat (the tokenizer's chat template)
    max_length: int = 512  # tokens per example
    overflow: str = "truncate"  # truncate or drop examples longer than max_length
    train_on_prompt: bool = False  # also train on the prompt tokens
    oasst_mode: str = "rank0"  # OpenAssistant: rank0 (best replies) or all root-to-leaf paths
    sample_prompts: int = 3  # validation prompts answered (greedily) at each evaluation
    sample_tokens: int = 64  # tokens per answer
    test_response_tokens: int = 128  # the best model answers every test prompt (test_responses.jsonl); 0: skip
    packing: bool = False  # pack each micro-batch's examples into rows of max_length tokens


def collate_sft(examples: list, pad_id: int) -> dict:
    """Right-padded (B, T) inputs and shifted targets: targets[t] = labels[t + 1] (-100 on padding)."""
    T = max(len(e.input_ids) for e in examples) - 1
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids) - 1
        ids[i, :n] = torch.tensor(e.input_ids[:-1])
        tgt[i, :n] = torch.tensor(e.labels[1:])
    return {"input_ids": ids, "targets": tgt}


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit: example i (``lengths[i]`` tokens) goes into the first row with room,
    in the given order; returns the example indices of each row."""
    rows, used = [], []
    for i, n in enumerate(lengths):
        r = next((r for r, u in enumerate(used) if u + n <= capacity), len(rows))
        if r == len(rows):
            rows.append([])
            used.append(0)
        rows[r].append(i)
        used[r] += n
    return rows


def collate_packed(examples: list, pad_id: int, capacity: int) -> dict:
    """Examples packed into rows of at most ``capacity`` positions: input_ids, targets,
    position_ids (restarting at 0 per example) and segment_ids (1, 2, ... per example; 0 on
    padding), all (R, T). Each example is shifted on its own, so targets never cross examples."""
    lengths = [len(e.input_ids) - 1 for e in examples]
    rows = pack_rows(lengths, capacity)
    T = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (R, T)
    tgt = torch.full((len(rows), T), IGNORE, dtype=torch.long)  # (R, T)
    pos = torch.zeros((len(rows), T), dtype=torch.long)  # (R, T)
    seg = torch.zeros((len(rows), T), dtype=torch.long)  # (R, T): 0 on padding
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row, start=1):
            e, n = examples[i], lengths[i]
            ids[r, at:at + n] = torch.tensor(e.input_ids[:-1])
            tgt[r, at:at + n] = torch.tensor(e.labels[1:])
            pos[r, at:at + n] = torch.arange(n)
            seg[r, at:at + n] = s
            at += n
    return {"input_ids": ids, "targets": tgt, "position_ids": pos, "segment_ids": seg}


def packing_line(sampler: StepSampler, lengths: list[int], capacity: int, max_steps: int) -> str:
    """How full packed rows are over (up to) one epoch of rank 0's micro-batches, beside unpacked padding."""
    steps = max(1, min(max_steps, -(-sampler.n // sampler.global_batch), 200))
    real = rows = padded = 0
    for step in range(steps):
        g = sampler.global_indices(step)
        for m in range(sampler.grad_accum):
            n = [lengths[i] - 1 for i in g[sampler.slice_of(m, 0)].tolist()]
            real, rows, padded = real + sum(n), rows + len(pack_rows(n, capacity)), padded + len(n) * max(n)
    return (f"packing: {capacity}-token rows, {real / (rows * capacity):.1%} of row capacity filled "
            f"({sampler.micro_batch} examples -> {rows / (steps * sampler.grad_accum):.2f} rows per micro-batch; "
            f"unpacked rows are {real / padded:.1%} real tokens), over {steps} steps")


class SampleAnswers(Callback):
    """Greedy answers to fixed validation prompts, appended to sft_samples.jsonl at each evaluation."""

    def __init__(self, run_dir, tokenizer, prompts: list[str], max_new_tokens: int):
        self.path = run_dir / "sft_samples.jsonl"
        self.tokenizer, self.prompts, self.max_new_tokens = tokenizer, prompts, max_new_tokens

    def on_evaluate(self, trainer, metrics):
        if not trainer.dist.is_main or not self.prompts:
            return
        answers = greedy_answers(trainer.model, self.tokenizer, self.prompts, self.max_new_tokens, batch_size=1)
        with open(self.path, "a", encoding="utf-8") as f:
            for p, answer in zip(self.prompts, answers, strict=True):
                f.write(json.dumps({"step": trainer.step, "time": time.time(), "prompt": p, "answer": answer},
                                   ensure_ascii=False) + "\n")


def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                   phase: Phase | None = None) -> list[str]:
    """The model's greedy continuation of each prompt, ``batch_size`` prompts per KV-cache decode
    (left-padded), in eval mode; the model's train/eval mode is restored after, and the packed
    copies generation made of trainable weights are dropped (training changes those weights).
    ``phase`` advances by each batch's prompts (progress of a long decode)."""
    was = model.training
    model.eval()
    try:
        out = []
        for s in range(0, len(prompts), batch_size):
            out += generate_text(model, tokenizer, prompts[s:s + batch_size], max_new_tokens=max_new_tokens,
                                 temperature=0.0)
            if phase is not None:
                phase.advance(len(prompts[s:s + batch_size]))
        return out
    finally:
        model.train(was)
        release_packed(model, trainable_only=True)


def prompt_text(record: dict, opts: SFTOptions, tokenizer) -> str | None:
    try:
        if opts.format == "alpaca" and opts.template != "chat":
            return prompt_response(record, opts.template)[0]

        msgs = record.get("messages") if opts.format == "messages" else None
        if opts.format == "oasst":  # the tree's first path: every turn before its last reply

            msgs = next(iter(oasst_paths(record, opts.oasst_mode)), None)
        if msgs is None and opts.format == "alpaca":
            msgs = alpaca_messages(record)
        if not msgs:
            return None
        turns = msgs[:-1] if msgs[-1].get("role") == "assistant" else msgs
        return render(turns, tokenizer, add_generation_prompt=True)
    except (DataError, ConfigError):
        return None


def tokenizer_text(record: dict, opts: SFTOptions) -> str:
    """What a fresh (char, bpe) tokenizer learns from: the rendered prompt and response of an Alpaca
    record (so the template's characters and real newlines are in it), else the record as JSON."""
    if opts.format == "alpaca" and opts.template != "chat":
        try:
            return "".join(prompt_response(record, opts.template))
        except DataError:
            pass
    return json.dumps(record, ensure_ascii=False)


def _records(sources) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "_where"} for r in read_records(source_specs(sources))]


def split_for_run(cfg: RunConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """Train, validation and test records: val/test sources of their own, or fractions of the
    training sources (seeded shuffle, or file order with ``data.split: ordered``)."""
    d = cfg.data
    fracs = (0.0 if d.val_sources else d.val_fraction, 0.0 if d.test_sources else d.test_fraction)
    records = _records(d.sources)
    if d.split == "ordered" or any(fracs):
        train, val, test = split_for_data(records, d, cfg.run.seed)
    else:
        train, val, test = records, [], []
    val = _records(d.val_sources) if d.val_sources else val
    return train, val, _records(d.test_sources) if d.test_sources else test


def write_test_responses(path, model, tokenizer, records: list[dict], o: SFTOptions, batch_size: int,
                         say=None) -> int:
    """Greedy answers to the test records' prompts (batched), one JSON line each beside the
    reference answer; returns how many were written. ``say`` shows the progress of the decode."""
    rows = [(r, p) for r in records if (p := prompt_text(r, o, tokenizer))]
    phase = Phase("test answers (greedy)", len(rows), say, unit="prompts")
    answers = greedy_answers(model, tokenizer, [p for _, p in rows], o.test_response_tokens, batch_size, phase)
    phase.end()
    with open(path, "w", encoding="utf-8") as f:
        for (r, p), a in zip(rows, answers, strict=True):
            f.write(json.dumps({"prompt": p, "reference": r.get("output"), "response": a.strip()},
                               ensure_ascii=False) + "\n")
    return len(rows)


def _build(ctx: TaskContext) -> TaskParts:
    cfg, o, t, dist = ctx.cfg, ctx.cfg.objective, ctx.cfg.train, ctx.dist
    train_recs, val_recs, test_recs = split_for_run(cfg)
    tokenizer = build_tokenizer(ctx, lambda: (tokenizer_text(r, o) for r in train_recs))
    model = build_model(ctx, tokenizer.vocab_size)
    if model.config.arch != "decoder":
        raise ConfigError(f"task: sft trains a decoder; model.arch is {model.config.arch!r}")
    if o.max_length > model.config.context_length:
        raise ConfigError(f"objective.max_length: {o.max_length} is longer than the model's context "
                          f"{model.config.context_length}")
    kw = dict(kind=o.format, template=o.template, max_length=o.max_length, overflow=o.overflow,
              train_on_prompt=o.train_on_prompt, oasst_mode=o.oasst_mode)
    train, val = build_examples(train_recs, tokenizer, **kw), build_examples(val_recs, tokenizer, **kw)
    test = build_examples(test_recs, tokenizer, **kw).examples
    if not train.examples or not val.examples:
        raise DataError(f"task sft: {len(train.examples)} training and {len(val.examples)} validation examples; "
                        f"expected at least one of each (data.val_fraction / data.val_sources)")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    sampler = StepSampler(len(train.examples), t.batch_size, t.grad_accum, dist.world_size, cfg.run.seed)

    def collate(idx: list[int]) -> dict:
        batch = [train.examples[i] for i in idx]
        return collate_packed(batch, pad, o.max_length) if o.packing else collate_sft(batch, pad)

    train_data = ExampleBatches(sampler, collate, dist.rank)
    ev = val.examples

    def val_batches(examples=ev):
        for s in range(0, len(examples), t.eval_batch_size):
            yield collate_sft(examples[s:s + t.eval_batch_size], pad)

    def finish(best_model, summary: dict) -> dict:
        """Loss and perplexity on the held-out test examples' response tokens (the best model)."""
        device = next(best_model.parameters()).device
        phase = Phase("test loss", len(test), ctx.say if dist.is_main else None, unit="examples")
        batches = ({k: v.to(device) for k, v in b.items()}
                   for b in phase.track(val_batches(test), size=lambda b: len(b["input_ids"])))
        metrics = CausalLM().evaluate(best_model, batches)
        if o.test_response_tokens > 0 and dist.is_main:
            n = write_test_responses(ctx.run_dir / "test_responses.jsonl", best_model, tokenizer, test_recs, o,
                                     t.eval_batch_size, say=ctx.say)
            ctx.say(f"test: {n} greedy responses of the best model in {ctx.run_dir / 'test_responses.jsonl'}")
        return {f"test_{k}": v for k, v in metrics.items()}

    prompts = [p for p in (prompt_text(r, o, tokenizer) for r in val_recs[:o.sample_prompts]) if p]
    mcfg = model.config
    epochs = epochs_line(ctx, len(train.examples) / sampler.global_batch)  # sets max_steps with train.epochs
    return TaskParts(
        model=model, tokenizer=tokenizer, objective=CausalLM(), train_data=train_data, eval_data=val_batches,
        flops_per_token=flops_per_token(mcfg, o.max_length),
        callbacks=[SampleAnswers(ctx.run_dir, tokenizer, prompts, o.sample_tokens)], finish=finish if test else None,
        describe=[f"data: train {train.as_dict()}, val {val.as_dict()}, test {len(test)} examples, {cfg.data.split} "
                  f"split (format {o.format}, template {o.template}, "
                  f"{'prompt and response' if o.train_on_prompt else 'response tokens only'} train)",
                  f"model: {mcfg.arch} {count_parameters(model):,} parameters, context {mcfg.context_length}",
                  f"batch: {t.batch_size} x {t.grad_accum} accum x {dist.world_size} procs = {sampler.global_batch} "
                  f"examples/step ({epochs}) on {dist.device}"]
        + ([packing_line(sampler, [len(e.input_ids) for e in train.examples], o.max_length, t.max_steps)]
           if o.packing else []))


def _check(cfg: RunConfig) -> list[str]:
    o, p = cfg.objective, []
    if o.format not in ("alpaca", "messages", "oasst"):
        p.append(f"objective.format: got {o.format!r}, expected alpaca, messages or oasst")
    if o.template not in ("alpaca", "book", "chat"):
        p.append(f"objective.template: got {o.template!r}, expected alpaca, book or chat")
    if o.overflow not in ("truncate", "drop"):
        p.append(f"objective.overflow: got {o.overflow!r}, expected truncate or drop")
    if o.test_response_tokens < 0:
        p.append(f"objective.test_response_tokens: got {o.test_response_tokens}, expected an integer >= 0")
    if o.max_length < 2:
        p.append(f"objective.max_length: got {o.max_length}, expected an integer >= 2")
    return p


SFT = Task("sft", "instruction / chat fine-tuning: the loss on response tokens only", SFTOptions, _build, _check)
