"""``task: classify``: text classification on a pretrained (or fresh) decoder or encoder.

Records carry a text field and a label field; the label set becomes the model's ``labels`` and
a classification head over the pooled hidden states (``model.num_classes``). Validation reports
loss, accuracy and macro-F1 during training; after training the best checkpoint is scored on the
validation and test splits with per-class precision/recall and the confusion matrix
(``eval_report.json`` + ``confusion_matrix_<split>.png`` in the run folder).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.config import RunConfig
from lmforge.data.splits import balance_records, label_set, record_label, record_text, split_for_data
from lmforge.data.sampler import ExampleBatches, StepSampler
from lmforge.data.sources import SourceSpec, iter_records, read_records
from lmforge.errors import ConfigError, DataError
from lmforge.inspect.figures import plot_confusion_matrix
from lmforge.fsutil import atomic_write
from lmforge.model import count_parameters, flops_per_token
from lmforge.objectives.classification import Classification
from lmforge.tasks import Task
from lmforge.tasks.common import (TaskContext, TaskParts, build_model, build_tokenizer, epochs_line,
                                  source_specs)


# ------------------------------------------------------------------------------ options
@dataclass
class ClassifyOptions:
    """``objective:`` options of ``task: classify``."""

    text_field: str = "text"  # record field holding the text
    label_field: str = "label"  # record field holding the label (string or integer)
    labels: list[str] | None = None  # label order (class ids); default: the sorted training labels. Names
    # for integer labels: [negative, positive] reads 0 as negative, 1 as positive (and prints names)
    max_length: int = 128  # tokens per example; longer texts are truncated (and counted)
    pooling: str | None = None  # mean, cls, last; default: last for decoders, the model's own for encoders
    class_weights: Any = None  # null, "balanced" (inverse label frequency), or one weight per class
    label_smoothing: float = 0.0



# ------------------------------------------------------------------------------ examples and batches
@dataclass
class ClassificationExamples:
    """Tokenized examples: ``ids[i]`` (a list of token ids) and ``labels[i]`` (a class id)."""

    ids: list[list[int]]
    labels: list[int]
    label_names: list[str]
    truncated: int = 0
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.label_names)}


def encode_classification(records: list[dict], tokenizer, text_field: str, label_field: str,
                          label_names: list[str], max_length: int, add_special: bool = False,
                          split: str = "train") -> ClassificationExamples:
    """Tokenize ``records``; a label outside ``label_names`` is a DataError naming the record."""
    index = {n: i for i, n in enumerate(label_names)}
    if not any(n.lstrip("-").isdigit() for n in label_names):  # named classes (objective.labels): an integer
        index.update({str(i): i for i in range(len(label_names))})  # label i in the data is the i-th name
    texts = [record_text(r, text_field) for r in records]
    labels = []
    for r in records:
        name = record_label(r, label_field)
        if name not in index:
            raise DataError(f"{r.get('_where', split)}: label {name!r} was never seen in training; "
                            f"expected one of {', '.join(label_names)}")
        labels.append(index[name])
    encoded = tokenizer.encode_batch(texts) if texts else []
    ids, truncated = [], 0
    for seq in encoded:
        seq = list(seq)
        if add_special:  # [CLS] text [SEP] (unless the tokenizer added them itself)
            if tokenizer.bos_id is not None and (not seq or seq[0] != tokenizer.bos_id):
                seq.insert(0, tokenizer.bos_id)
            if tokenizer.eos_id is not None and seq[-1] != tokenizer.eos_id:
                seq.append(tokenizer.eos_id)
        if len(seq) > max_length:
            truncated += 1
            seq = seq[:max_length - 1] + seq[-1:] if add_special else seq[:max_length]
        if not seq:
            seq = [tokenizer.pad_id if tokenizer.pad_id is not None else 0]
        ids.append(seq)
    return ClassificationExamples(ids=ids, labels=labels, label_names=label_names, truncated=truncated, texts=texts)


def collate_classification(ids: list[list[int]], labels: list[int], pad_id: int) -> dict:
    """Right-pad a micro-batch to its own longest example: input_ids/attention_mask (B, T), labels (B,)."""
    T = max(len(s) for s in ids)
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, s in enumerate(ids):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(labels, dtype=torch.long)}


# ------------------------------------------------------------------------------ splits

# ------------------------------------------------------------------------------ data
def split_for_run(cfg: RunConfig) -> dict[str, list[dict]]:
    """train/val/test records: the sources, optionally balanced, split (stratified by label) into
    the fractions the ``data:`` section asks, unless val/test have sources of their own."""
    o, d = cfg.objective, cfg.data
    records = read_records(source_specs(d.sources))
    key = (lambda r: record_label(r, o.label_field))
    for r in records[:1]:
        record_label(r, o.label_field), record_text(r, o.text_field)  # a missing field fails fast, clearly
    if d.balance:
        records = balance_records(records, key, cfg.run.seed)
    train, val, test = split_for_data(records, d, cfg.run.seed, key if d.stratify else None)
    if d.val_sources:
        val = read_records(source_specs(d.val_sources))
    if d.test_sources:
        test = read_records(source_specs(d.test_sources))
    return {"train": train, "val": val, "test": test}


def labels_of(records: list[dict], opts: ClassifyOptions) -> list[str]:
    names = opts.labels or label_set([record_label(r, opts.label_field) for r in records])
    if len(names) < 2:
        raise DataError(f"only one label ({', '.join(map(repr, names))}) in the training data; a classifier "
                        f"needs at least two (check objective.label_field: {opts.label_field!r})")
    return list(names)


def class_weights(spec, examples: ClassificationExamples) -> list[float] | None:
    if spec is None:
        return None
    k = len(examples.label_names)
    if spec == "balanced":  # n / (K * count): every class weighs the same in total
        counts = examples.counts()
        return [len(examples) / (k * max(counts[n], 1)) for n in examples.label_names]
    if isinstance(spec, list) and len(spec) == k and all(isinstance(w, (int, float)) and w > 0 for w in spec):
        return [float(w) for w in spec]
    raise ConfigError(f"objective.class_weights: got {spec!r}, expected null, 'balanced' or {k} positive numbers")


def fixed_batches(examples: ClassificationExamples, batch_size: int, pad_id: int):
    """A callable giving the same batches each time; examples sorted by length (less padding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples.ids[i]))

    def batches():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            yield collate_classification([examples.ids[i] for i in idx], [examples.labels[i] for i in idx], pad_id)

    return batches


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else 0


# ------------------------------------------------------------------------------ builder
def _build(ctx: TaskContext) -> TaskParts:
    cfg, o, t, dist = ctx.cfg, ctx.cfg.objective, ctx.cfg.train, ctx.dist
    splits = split_for_run(cfg)
    names = labels_of(splits["train"], o)
    tokenizer = build_tokenizer(ctx, lambda: (record_text(r, o.text_field) for r in splits["train"]))
    head = {"num_classes": len(names), "labels": names}
    if o.pooling:
        head["pooling"] = o.pooling
    elif not cfg.init_from and cfg.model_config(vocab_size=tokenizer.vocab_size).causal:
        head["pooling"] = "last"
    model = build_model(ctx, tokenizer.vocab_size, **head)
    if model.config.causal and model.config.pooling == "cls":
        raise ConfigError("objective.pooling: 'cls' on a causal decoder sees only the first token; expected last or mean")
    add_special = not model.config.causal
    enc = {s: encode_classification(r, tokenizer, o.text_field, o.label_field, names, o.max_length, add_special, s)
           for s, r in splits.items() if r}
    train = enc["train"]
    if "val" not in enc:
        raise ConfigError("data.val_fraction: the validation split is empty; raise val_fraction or give val_sources")
    objective = Classification(len(names), class_weights(o.class_weights, train), o.label_smoothing, names)
    pad = pad_id_of(tokenizer)
    sampler = StepSampler(len(train), t.batch_size, t.grad_accum, dist.world_size, cfg.run.seed)
    train_data = ExampleBatches(
        sampler, lambda idx: collate_classification([train.ids[i] for i in idx], [train.labels[i] for i in idx], pad),
        dist.rank)
    mcfg = model.config
    fpt = flops_per_token(mcfg, o.max_length) - 6 * mcfg.n_embd * mcfg.vocab_size  # no LM head matmul
    steps_per_epoch = len(train) / sampler.global_batch

    def finish(best_model, summary: dict) -> dict:
        return write_reports(ctx, objective, best_model, {s: e for s, e in enc.items() if s != "train"}, pad)

    counts = ", ".join(f"{s} {len(e)}" for s, e in enc.items())
    trunc = ", ".join(f"{s} {e.truncated}" for s, e in enc.items() if e.truncated)
    return TaskParts(
        model=model, tokenizer=tokenizer, objective=objective, train_data=train_data,
        eval_data=fixed_batches(enc["val"], t.eval_batch_size, pad), flops_per_token=fpt, finish=finish,
        describe=[f"data: {counts} examples; labels {train.counts()}",
                  f"truncated to max_length {o.max_length}: " + (trunc or "none"),
                  f"model: {mcfg.arch} {count_parameters(model):,} parameters, {len(names)}-way head, "
                  f"pooling {mcfg.pooling}, {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable "
                  f"before train.trainable={t.trainable}",
                  f"batch: {t.batch_size} x {t.grad_accum} accum x {dist.world_size} procs = {sampler.global_batch} "
                  f"examples/step ({epochs_line(ctx, steps_per_epoch)}) on {dist.device}"])


def write_reports(ctx: TaskContext, objective: Classification, model, splits: dict, pad: int) -> dict:
    """Score ``model`` on each split; write eval_report.json and a confusion-matrix PNG per split."""
    if not ctx.dist.is_main:
        return {}
    device = next(model.parameters()).device
    reports = {}
    for split, ex in splits.items():
        batches = ({k: v.to(device) for k, v in b.items()}
                   for b in fixed_batches(ex, ctx.cfg.train.eval_batch_size, pad)())
        r = objective.report(model, batches)
        reports[split] = r
        plot_confusion_matrix(r["confusion_matrix"], r["labels"], ctx.run_dir / f"confusion_matrix_{split}.png",
                              title=f"{ctx.cfg.run.name}: {split} ({r['examples']} examples)")
        ctx.say(f"{split}: accuracy {r['accuracy']:.4f}  macro_f1 {r['macro_f1']:.4f}  loss {r['loss']:.4f}  "
                + "  ".join(f"{n}: P {m['precision']:.3f} R {m['recall']:.3f}" for n, m in r["per_class"].items()))
    text = json.dumps(reports, indent=2)
    atomic_write(ctx.run_dir / "eval_report.json", lambda p: p.write_text(text))
    return {"reports": reports}


def _check(cfg: RunConfig) -> list[str]:
    o = cfg.objective
    p = []
    if o.max_length < 2:
        p.append(f"objective.max_length: got {o.max_length}, expected an integer >= 2")
    if o.pooling is not None and o.pooling not in ("mean", "cls", "last"):
        p.append(f"objective.pooling: got {o.pooling!r}, expected mean, cls, last or null")
    if o.labels is not None and (len(o.labels) < 2 or len(set(map(str, o.labels))) != len(o.labels)):
        p.append(f"objective.labels: got {o.labels!r}, expected at least two distinct label names")
    if not 0 <= o.label_smoothing < 1:
        p.append(f"objective.label_smoothing: got {o.label_smoothing}, expected a number in [0, 1)")
    if not cfg.init_from:
        mcfg = cfg.model_config(vocab_size=cfg.model.get("vocab_size") or 1)
        if mcfg.arch == "bigram":
            p.append("model.arch: a bigram model cannot classify; expected a decoder or encoder")
        if mcfg.causal and o.pooling == "cls":
            p.append("objective.pooling: 'cls' on a causal decoder sees only the first token; expected last or mean")
        if o.max_length > mcfg.context_length:
            p.append(f"objective.max_length: {o.max_length} is longer than model.context_length {mcfg.context_length}")
    if o.labels is not None:
        o.labels = [str(x) for x in o.labels]
    return p


# ------------------------------------------------------------------------------ inference
def evaluate_records(model, tokenizer, records: list[dict], text_field: str, label_field: str,
                     max_length: int, batch_size: int = 32) -> dict:
    """Score a classifier on records (``lmforge eval``): accuracy, macro-F1, per class, confusion."""
    names = model.config.labels or [str(i) for i in range(model.config.num_classes)]
    ex = encode_classification(records, tokenizer, text_field, label_field, names, max_length,
                               not model.config.causal, "eval")
    objective = Classification(len(names), label_names=names)
    device = next(model.parameters()).device
    batches = ({k: v.to(device) for k, v in b.items()} for b in fixed_batches(ex, batch_size, pad_id_of(tokenizer))())
    return {**objective.report(model, batches), "truncated": ex.truncated}


@torch.no_grad()
def classify_texts(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 32) -> list[dict]:
    """Label and class probabilities of each text: [{"label": ..., "probs": {label: p}}]."""
    names = model.config.labels or [str(i) for i in range(model.config.num_classes)]
    records = [{"text": t, "label": names[0]} for t in texts]
    ex = encode_classification(records, tokenizer, "text", "label", names, max_length, not model.config.causal)
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(ex), batch_size):
        b = collate_classification(ex.ids[s:s + batch_size], ex.labels[s:s + batch_size], pad_id_of(tokenizer))
        probs = model(b["input_ids"].to(device), b["attention_mask"].to(device), head="cls").float().softmax(-1)
        for row in probs.cpu().tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append({"label": names[best], "probs": {n: round(p, 6) for n, p in zip(names, row)}})
    return out


def eval_classifier(model, tokenizer, run_config: dict, req) -> dict:
    """A classifier scored on the labelled records of ``req.data`` (``lmforge eval``): the fields
    default to the ones it was trained with; a file of the training file's kind (same extension)
    is read with its layout (columns, quoting, format), any other by its own extension."""
    opts = saved_options(run_config)
    src = {}
    sources = (run_config.get("data") or {}).get("sources") or []
    trained_on = sources[0] if sources and isinstance(sources[0], dict) else {}
    if Path(str(trained_on.get("path", ""))).suffix.lower() == Path(req.data).suffix.lower():
        src = {k: trained_on[k] for k in ("columns", "quoting", "format") if k in trained_on}
    if req.columns:
        src["columns"] = list(req.columns)
    records = list(iter_records(SourceSpec(path=req.data, limit=req.limit, split=req.split, **src)))
    r = evaluate_records(model, tokenizer, records, req.text_field or opts.text_field,
                         req.label_field or opts.label_field, opts.max_length, req.batch_size)
    return {"examples": r["examples"], "loss": r["loss"], "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
            "per_class": r["per_class"], "labels": r["labels"], "confusion_matrix": r["confusion_matrix"],
            "truncated": r["truncated"]}


def saved_options(run_config: dict) -> ClassifyOptions:
    """The classify options a checkpoint was trained with (defaults where absent)."""
    raw = dict(run_config.get("objective") or {})
    known = ClassifyOptions.__dataclass_fields__
    return ClassifyOptions(**{k: v for k, v in raw.items() if k in known})


CLASSIFY = Task("classify", "text classification: a label per text, head over pooled hidden states",
                ClassifyOptions, _build, _check, for_eval=eval_classifier)
