#!/usr/bin/env python
"""GRPO side by side with TRL's GRPOTrainer: SmolLM2-135M-Instruct (GGUF, fp32, CPU) with LoRA rank 8
(alpha 16, dropout 0, q and v) on GSM8K prompts, exact-match reward on the final number.

Both sides take the same prompts in the same order (lmforge's step sampler; TRL with
``shuffle_dataset=False``), sample K completions per prompt at temperature 1 (no top-k/top-p)
up to the same completion length, reward them with lmforge's ``exact_match`` (TRL through a
reward function that calls it), group-normalised advantages, loss ``grpo``, beta 0 (no
reference), one update per rollout batch, the same learning rate, AdamW and clipping. Prompts
are the raw question strings on both sides (TRL: a plain ``prompt`` column, not conversational).

* Speed: wall time per optimizer step, generation included, after ``--warmup`` steps; each side
  in its own process (peak RSS of each). Sampling differs between the libraries, so the
  completion lengths (and the time generation takes) are reported for both.
* Step-0 agreement: the *same* rollouts (the step-0 prompts; per prompt a correct final answer
  ``#### N``, a wrong one, and K-2 completions sampled from the model; rewards by exact match,
  lmforge's group advantages) go through lmforge's GRPO loss (``GRPO.loss``) and TRL's
  (``GRPOTrainer.compute_loss``, old log-probs = current ones). With ratio 1 the loss value is
  ``-mean(advantages)`` = 0 on both whatever the model, so the per-token completion log-probs,
  the entropy and the gradient are compared too: PEFT's LoRA A matrices are set to lmforge's (B
  is 0 on both), and the norm of each adapter's B gradient must agree (a norm, because it does
  not depend on the order of the output rows). Each trainer's own logged step-0 loss is
  reported as well.

With ``--fixed-length`` every completion is exactly ``--max-completion-length`` tokens on both
sides (the end-of-sequence token held back: lmforge's ``objective.min_completion_length``,
transformers' ``min_new_tokens``), so both time the same amount of generation and training.

Results: ``benchmarks/results/trl_grpo.json`` (``trl_grpo_fixed_length.json``) and a printed table.

    .venv/bin/python benchmarks/bench_trl_grpo.py --steps 5 --warmup 1 --threads 2
    .venv/bin/python benchmarks/bench_trl_grpo.py --steps 5 --warmup 1 --threads 2 --fixed-length
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import prepare  # noqa: E402
from _trl_common import (LORA, SMOLLM2_INIT, hf_clock, hf_smollm2, lmforge_clock, load_average,  # noqa: E402
                         peak_rss_mb, peft_lora_config, run_side, versions, warn_if_busy)

DATA = "catalog:gsm8k-train"


def lm_config(args, out_dir: Path):
    """The lmforge run: task grpo on GSM8K prompts, LoRA on SmolLM2."""
    from lmforge.tasks import config_from_dict

    return config_from_dict({
        "task": "grpo",
        "run": {"name": "bench-trl-grpo", "out_dir": str(out_dir), "seed": args.seed},
        "model": {"init_from": SMOLLM2_INIT, "lora": dict(LORA)},
        "objective": {"num_generations": args.k, "max_completion_length": args.max_completion_length,
                      "temperature": 1.0, "beta": 0.0, "num_iterations": 1, "loss_type": "grpo",
                      "scale_rewards": "group", "format": "gsm8k", "rewards": ["exact_match"],
                      "sample_completions": 0,
                      "min_completion_length": args.max_completion_length if args.fixed_length else 0},
        # held out: 2 prompts (the task needs them; evaluated greedily after the last timed step)
        "data": {"sources": [{"path": DATA}], "val_sources": [{"path": DATA, "limit": 2}]},
        "train": {"max_steps": args.steps, "batch_size": args.prompts, "grad_accum": 1, "lr": args.lr,
                  "min_lr": args.lr, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
                  "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "grad_clip": 1.0, "eval_every": 10**6,
                  "eval_batch_size": 2, "log_every": 1, "checkpoint_every": None, "keep_last": 1,
                  "best_metric": None, "resume": "never", "progress": False},
        "logging": {"report": False},
    })


def prompts_in_order(args, cfg, steps: int) -> list[dict]:
    """lmforge's training records ({prompt, answer, solution}) in the order its step sampler
    draws them, steps 0..steps-1."""
    from lmforge.data.sampler import StepSampler
    from lmforge.tasks.grpo import split_for_run

    train = split_for_run(cfg)["train"]
    sampler = StepSampler(len(train), args.prompts, 1, 1, cfg.run.seed)
    return [train[i] for s in range(steps) for i in sampler.global_indices(s).tolist()]


def grpo_config(args, out_dir: Path, steps: int):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=args.prompts * args.k, num_generations=args.k,
        gradient_accumulation_steps=1, max_steps=steps, max_completion_length=args.max_completion_length,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1, loss_type="grpo", scale_rewards="group",
        mask_truncated_completions=False, shuffle_dataset=False, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=args.seed, bf16=False,
        fp16=False,
        generation_kwargs={"min_new_tokens": args.max_completion_length} if args.fixed_length else None)


def exact_match(prompts, completions, answer, **kwargs):
    """TRL reward function: lmforge's exact match on the final number."""
    from lmforge.objectives.rewards import exact_match as lm_exact_match

    return lm_exact_match(completions, answer)


def trl_trainer(args, records: list[dict], out_dir: Path, steps: int, callbacks=()):
    from datasets import Dataset
    from trl import GRPOTrainer

    model, tok = hf_smollm2()
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in records])
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_match], args=grpo_config(args, out_dir, steps),
                          train_dataset=data, processing_class=tok, peft_config=peft_lora_config(),
                          callbacks=list(callbacks))
    return trainer, tok


def lmforge_tokenizer():
    from lmforge.interop.gguf import open_gguf, read_metadata, tokenizer_from_gguf
    from lmforge.tasks.common import resolve_init_path

    return tokenizer_from_gguf(read_metadata(open_gguf(resolve_init_path(SMOLLM2_INIT))))


# ------------------------------------------------------------------------------ timed sides
def side_lmforge(args, work: Path) -> dict:
    from lmforge.tasks.run import run

    out = work / "lmforge"
    if out.exists():
        shutil.rmtree(out)
    clock = lmforge_clock()
    t0 = time.perf_counter()
    run(lm_config(args, out), progress=False, print_fn=(lambda *a, **k: None) if args.quiet else print,
        callbacks=[clock])
    m = clock.metrics
    return {"wall_seconds": time.perf_counter() - t0, "step_seconds": clock.step_seconds(),
            "seconds_per_step": clock.seconds_per_step(args.warmup), "losses": [x["loss"] for x in m],
            "rewards": [x.get("reward") for x in m], "completion_lengths": [x.get("completion_length") for x in m],
            "step0": {"loss": m[0]["loss"], "reward": m[0].get("reward"), "entropy": m[0].get("entropy")},
            "peak_rss_mb": peak_rss_mb()}


def side_trl(args, work: Path) -> dict:
    records = prompts_in_order(args, lm_config(args, work / "config-only"), args.steps)
    t0 = time.perf_counter()
    clock = hf_clock()
    trainer, tok = trl_trainer(args, records, work / "trl", args.steps, [clock])
    lm_tok = lmforge_tokenizer()
    prompt_ids_differ = sum(tok(r["prompt"])["input_ids"] != lm_tok.encode(r["prompt"]) for r in records)
    setup = time.perf_counter() - t0
    trainer.train()
    m = clock.metrics
    return {"wall_seconds": time.perf_counter() - t0, "setup_seconds": setup, "step_seconds": clock.step_seconds(),
            "seconds_per_step": clock.seconds_per_step(args.warmup), "losses": [x.get("loss") for x in m],
            "rewards": [x.get("reward") for x in m],
            "completion_lengths": [x.get("completions/mean_length") for x in m],
            "step0": {"loss": m[0].get("loss"), "reward": m[0].get("reward"), "entropy": m[0].get("entropy")},
            "prompt_ids_differ": prompt_ids_differ, "prompts": len(records), "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------------------ same rollouts, both losses
def same_rollouts(args, records: list[dict], model, tok) -> dict:
    """The step-0 prompts with K completions each: a correct final answer, a wrong one, and K-2
    sampled from ``model``; lmforge's rollout rows, rewards, advantages."""
    from lmforge.generate import generate
    from lmforge.tasks.grpo import rollout_rows, sampling
    from lmforge.objectives.grpo_math import group_advantages
    from lmforge.objectives.rewards import build_rewards

    K, L, eos = args.k, args.max_completion_length, tok.eos_id
    o = lm_config(args, Path("unused")).objective
    prompt_ids = [tok.encode(r["prompt"]) for r in records]
    sampled = generate(model, [p for p in prompt_ids for _ in range(K - 2)], sampling(o, eos, args.seed),
                       tokenizer=tok)
    prompts, outs = [], []
    for i, (r, p) in enumerate(zip(records, prompt_ids)):
        right, wrong = f"#### {r['answer']}", f"#### {r['answer']}1"
        group = [tok.encode(right), tok.encode(wrong)] + sampled[i * (K - 2):(i + 1) * (K - 2)]
        prompts += [p] * K
        outs += [c[:L] for c in group]
    truncated = [len(c) >= L for c in outs]
    finished = [not t for t in truncated]
    texts = [tok.decode(c) for c in outs]
    answers = [r["answer"] for r in records for _ in range(K)]
    total, _ = build_rewards(["exact_match"])([r["prompt"] for r in records for _ in range(K)], texts, answers,
                                              [len(c) for c in outs])
    batch = rollout_rows(prompts, outs, finished, eos, tok.pad_id if tok.pad_id is not None else 0)
    batch["advantages"] = group_advantages(total, K, "group").advantages  # (N,)
    batch["truncated"] = torch.tensor(truncated)
    return {"batch": batch, "prompts": prompts, "completions": [c + ([eos] if f else []) for c, f in zip(outs, finished)],
            "rewards": total.tolist(), "options": o}


def lmforge_loss(roll: dict, model, tok) -> dict:
    from lmforge.model.lora import LoraLinear
    from lmforge.objectives.grpo import GRPO
    from lmforge.objectives.logprobs import completion_logprobs

    o = roll["options"]
    obj = GRPO(o.loss_type, o.epsilon_low, o.epsilon_high, o.beta, o.max_completion_length, o.mask_truncated)
    obj.setup(model, torch.device("cpu"))
    model.train()
    batch = roll["batch"]
    loss, metrics = obj.loss(model, batch)
    loss.backward()
    grads = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            layer = int(name.split(".")[2])  # transformer.blocks.{i}.attn.qkv
            for role, ad in m.lora.items():
                grads[f"{layer}.{role}"] = float(ad.B.grad.norm())
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logp, mask = completion_logprobs(model(batch["input_ids"]), batch["input_ids"], batch["completion_mask"])
    per_row = [logp[i][mask[i] > 0].tolist() for i in range(logp.shape[0])]  # completion tokens, in order
    return {"loss": float(loss.detach()), "entropy": metrics["entropy"],
            "mean_token_logp": float((logp * mask).sum() / mask.sum()), "per_row": per_row, "grads": grads}


def trl_loss(roll: dict, trainer, tok) -> dict:
    pad = tok.pad_token_id
    P = max(len(p) for p in roll["prompts"])
    C = max(len(c) for c in roll["completions"])
    n = len(roll["prompts"])
    prompt_ids = torch.full((n, P), pad, dtype=torch.long)  # (N, P) left-padded, as TRL generates
    prompt_mask = torch.zeros(n, P, dtype=torch.long)
    completion_ids = torch.full((n, C), pad, dtype=torch.long)  # (N, C) right-padded
    completion_mask = torch.zeros(n, C, dtype=torch.long)
    for i, (p, c) in enumerate(zip(roll["prompts"], roll["completions"])):
        prompt_ids[i, P - len(p):], prompt_mask[i, P - len(p):] = torch.tensor(p), 1
        completion_ids[i, :len(c)], completion_mask[i, :len(c)] = torch.tensor(c), 1
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": roll["batch"]["advantages"],
              "num_items_in_batch": completion_mask.sum()}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {}
    for name, prm in trainer.model.named_parameters():
        if "lora_B" in name:  # ...layers.{i}.self_attn.{q,v}_proj.lora_B.default.weight
            parts = name.split(".")
            layer = parts[parts.index("layers") + 1]
            grads[f"{layer}.{parts[parts.index('self_attn') + 1][0]}"] = float(prm.grad.norm())
    trainer.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logps, ent, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            C, compute_entropy=True)
    m = completion_mask.float()
    per_row = [logps[i, :len(c)].tolist() for i, c in enumerate(roll["completions"])]
    return {"loss": float(loss.detach()), "entropy": float((ent * m).sum() / m.sum()),
            "mean_token_logp": float((logps * m).sum() / m.sum()), "per_row": per_row, "grads": grads}


def copy_lora_a(model, peft_model) -> None:
    """Set PEFT's LoRA A matrices to lmforge's (both start with B = 0), so the gradients compare."""
    from lmforge.model.lora import PEFT_MODULES, LoraLinear

    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoraLinear):
                layer = int(name.split(".")[2])  # transformer.blocks.{i}.attn.qkv
                for role, ad in m.lora.items():
                    key = f"base_model.model.model.layers.{layer}.{PEFT_MODULES[role]}.lora_A.default.weight"
                    params[key].copy_(ad.A)


def side_agree(args, work: Path) -> dict:
    from lmforge import from_pretrained
    from lmforge.tasks.common import resolve_init_path, with_lora

    records = prompts_in_order(args, lm_config(args, work / "config-only"), 1)
    model, tok = from_pretrained(resolve_init_path(SMOLLM2_INIT), with_tokenizer=True)
    model = with_lora(model, LORA)
    roll = same_rollouts(args, records, model, tok)
    ours = lmforge_loss(roll, model, tok)
    trainer, hf_tok = trl_trainer(args, records, work / "trl-agree", 1)
    copy_lora_a(model, trainer.model)
    theirs = trl_loss(roll, trainer, hf_tok)
    diffs = [abs(a - b) for ra, rb in zip(ours.pop("per_row"), theirs.pop("per_row")) for a, b in zip(ra, rb)]
    ga, gb = ours.pop("grads"), theirs.pop("grads")
    if set(ga) != set(gb):
        raise SystemExit(f"LoRA adapters differ: lmforge {sorted(ga)}, PEFT {sorted(gb)}")
    ours["grad_norm_B"] = sum(v * v for v in ga.values()) ** 0.5
    theirs["grad_norm_B"] = sum(v * v for v in gb.values()) ** 0.5
    return {"lmforge": ours, "trl": theirs, "rewards": roll["rewards"],
            "advantages": roll["batch"]["advantages"].tolist(),
            "completion_tokens": [len(c) for c in roll["completions"]],
            "max_abs_token_logp_diff": max(diffs),
            "loss_abs_diff": abs(ours["loss"] - theirs["loss"]),
            "max_rel_grad_norm_diff": max(abs(ga[k] - gb[k]) / max(ga[k], gb[k], 1e-12) for k in ga),
            "prompt_ids_identical": all(hf_tok(r["prompt"])["input_ids"] == tok.encode(r["prompt"]) for r in records)}


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the timing")
    p.add_argument("--prompts", type=int, default=2, help="prompts per optimizer step")
    p.add_argument("--k", type=int, default=4, help="completions per prompt")
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--fixed-length", action="store_true",
                   help="every completion exactly --max-completion-length tokens on both sides (eos held back: "
                        "lmforge objective.min_completion_length, transformers min_new_tokens), so the timed "
                        "work is the same whatever each library samples")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default="runs/bench/results")
    p.add_argument("--work-dir", default="runs/bench/trl_grpo")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--side", choices=["both", "lmforge", "trl", "agree"], default="both", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out, work = prepare(args.out_dir, args.work_dir, args.threads)
    work.mkdir(parents=True, exist_ok=True)
    if args.side != "both":
        r = {"lmforge": side_lmforge, "trl": side_trl, "agree": side_agree}[args.side](args, work)
        Path(args.result).write_text(json.dumps(r))
        return 0
    load = warn_if_busy()
    passed = list(argv if argv is not None else sys.argv[1:])
    script = Path(__file__).resolve()
    agree = run_side(script, "agree", passed, work / "agree.json", args.threads)
    lm = run_side(script, "lmforge", passed, work / "lmforge.json", args.threads)
    hf = run_side(script, "trl", passed, work / "trl.json", args.threads)
    timed = slice(args.warmup, None)
    result = {
        "lmforge": lm, "trl": hf, "same_rollouts": agree,
        "seconds_per_step": {"lmforge": lm["seconds_per_step"], "trl": hf["seconds_per_step"]},
        "ratio_lmforge_over_trl": lm["seconds_per_step"] / hf["seconds_per_step"],
        "mean_completion_length_timed": {
            "lmforge": statistics.mean(x for x in lm["completion_lengths"][timed] if x is not None),
            "trl": statistics.mean(x for x in hf["completion_lengths"][timed] if x is not None)},
        "step0_agree": (agree["loss_abs_diff"] < 1e-4 and agree["max_abs_token_logp_diff"] < 1e-3
                        and agree["max_rel_grad_norm_diff"] < 1e-3),
        "targets": {"ratio": 0.5, "loss_abs_diff": 1e-4},
        "settings": {"model": "SmolLM2-135M-Instruct.Q4_1.gguf (fp32)", "lora": LORA, "data": DATA,
                     "steps": args.steps, "warmup_steps": args.warmup, "prompts_per_step": args.prompts,
                     "k": args.k, "max_completion_length": args.max_completion_length, "temperature": 1.0,
                     "beta": 0.0, "num_iterations": 1, "loss_type": "grpo", "scale_rewards": "group",
                     "reward": "lmforge.objectives.rewards.exact_match (both)", "lr": args.lr, "schedule": "constant",
                     "optimizer": "AdamW (0.9, 0.999), wd 0, clip 1.0", "trl_gradient_checkpointing": False,
                     "prompt_format": "raw question string (both)", "threads": args.threads, "seed": args.seed,
                     "device": "cpu", "fixed_length": args.fixed_length},
        "versions": versions(), "load_average_at_start": load, "load_average_at_end": load_average(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / ("trl_grpo_fixed_length.json" if args.fixed_length else "trl_grpo.json")).write_text(
        json.dumps(result, indent=2))
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    lm, hf, a = r["lmforge"], r["trl"], r["same_rollouts"]
    c = r["mean_completion_length_timed"]
    print("\n| GRPO, SmolLM2-135M LoRA | lmforge | TRL GRPOTrainer | ratio / agreement |\n|---|---|---|---|")
    print(f"| s/optimizer step (generation included) | {lm['seconds_per_step']:.2f} | {hf['seconds_per_step']:.2f} | "
          f"x{r['ratio_lmforge_over_trl']:.2f} (target <= x0.5) |")
    print(f"| mean completion length (timed steps) | {c['lmforge']:.1f} | {c['trl']:.1f} | |")
    print(f"| same rollouts: loss | {a['lmforge']['loss']:.6f} | {a['trl']['loss']:.6f} | "
          f"abs diff {a['loss_abs_diff']:.1e} |")
    print(f"| same rollouts: mean token log-prob | {a['lmforge']['mean_token_logp']:.5f} | "
          f"{a['trl']['mean_token_logp']:.5f} | max abs diff per token {a['max_abs_token_logp_diff']:.1e} |")
    print(f"| same rollouts: LoRA B gradient norm | {a['lmforge']['grad_norm_B']:.6g} | {a['trl']['grad_norm_B']:.6g} | "
          f"max rel diff per adapter {a['max_rel_grad_norm_diff']:.1e} |")
    print(f"| same rollouts: entropy | {a['lmforge']['entropy']:.5f} | {a['trl']['entropy']:.5f} | |")
    print(f"| trainer's own step-0 loss / reward | {lm['step0']['loss']:.5f} / {lm['step0']['reward']} | "
          f"{hf['step0']['loss']:.5f} / {hf['step0']['reward']} | (own samples) |")
    print(f"| peak RSS | {lm['peak_rss_mb']:.0f} MB | {hf['peak_rss_mb']:.0f} MB | |")
    print(f"| load average start / end | | | {r['load_average_at_start']} / {r['load_average_at_end']} |")


if __name__ == "__main__":
    sys.exit(main())
