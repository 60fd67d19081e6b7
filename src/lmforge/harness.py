"""lm-evaluation-harness on any lmforge model: ``lmforge eval --harness TASKS --model M``.

EleutherAI's harness (``pip install 'lmforge[harness]'``, the ``lm_eval`` package) asks a model
three kinds of question; :class:`LMForgeLM` answers them with lmforge's own code:

``loglikelihood``
    ``(context, continuation)`` -> (sum of the continuation's log-probabilities, whether greedy
    decoding would have produced it). Context and continuation are tokenized as the harness's
    ``hf`` model does (the whole text, then the context's tokens are split off; trailing spaces
    of the context go to the continuation), sorted longest first, right-padded into batches and
    run through one forward each; only the continuation positions go through the LM head.
``loglikelihood_rolling``
    the log-likelihood of a whole text (perplexity tasks): the tokens are cut into windows of the
    model's context (``lm_eval.utils.get_rolling_token_windows``, the first one after the prefix
    token) and each token is scored exactly once, with as much context as fits.
``generate_until``
    greedy (or sampled) text from :func:`lmforge.generate.generate_text`: the KV-cache, batched,
    left-padded generation, stopping at the ``until`` strings, the tokenizer's eos or after
    ``max_gen_toks`` tokens; the text is cut before the first stop string. Past the context,
    lmforge slides its window (RoPE) or crops (learned positions) as it always does.

The harness's own command line works too, once this module is imported (lm_eval 0.4.13 finds
models only through its registry; it has no entry-point discovery for model classes)::

    python -m lmforge.harness --model lmforge --model_args model=PATH --tasks hellaswag

which registers ``lmforge`` and hands the arguments to ``lm_eval``'s command line. In Python,
``import lmforge.harness`` before ``lm_eval.simple_evaluate(model="lmforge", ...)``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import MODEL_MAPPING  # noqa: F401  (registers hf, vllm, ... beside lmforge: see below)
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

from lmforge.errors import InputError
from lmforge.generate import SamplingConfig, generate_text
from lmforge.store import load_for_inference

# Importing lm_eval.models above puts the harness's own model names into its registry: its
# get_model() loads them only when the registry is empty, which it no longer is once "lmforge" is in.

__all__ = ["LMForgeLM", "evaluate_harness", "task_metrics", "write_results", "main"]

# generation options a task's gen_kwargs may carry besides until / max_gen_toks / do_sample / temperature
_SAMPLING_KEYS = ("top_k", "top_p", "repetition_penalty", "seed")


@register_model("lmforge")
class LMForgeLM(TemplateLM):
    """An lmforge decoder as a harness model: ``LMForgeLM(model="path/or/name")`` loads it with
    :func:`lmforge.store.load_for_inference`; ``LMForgeLM(model=module, tokenizer=tok)`` wraps one
    already loaded.

    ``batch_size``: sequences per forward; ``max_length``: the window in tokens (default the
    model's ``context_length``); ``max_gen_toks``: new tokens when a task does not say. Texts are
    tokenized as the tokenizer does by default (an imported tokenizer's post-processor adds its
    bos, as with ``hf``). ``max_batch_size`` is accepted because the harness passes it to every
    model; lmforge has no automatic batch size, so it is unused.
    """

    def __init__(self, model=None, tokenizer=None, device: str = "cpu", batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, quantize: str = "none",
                 max_batch_size: int | None = None):
        super().__init__()
        if model is None:
            raise InputError("lmforge harness model: no model given; expected model=PATH (--model_args model=PATH)")
        if isinstance(model, (str, Path)):
            device = _usable_device(device)
            model, tokenizer, _, _ = load_for_inference(str(model), device, quantize=quantize,
                                                        need_tokenizer="lm-evaluation-harness")
        if tokenizer is None:
            raise InputError("lmforge harness model: no tokenizer; expected tokenizer= beside a loaded model")
        arch = getattr(getattr(model, "config", None), "arch", None)
        if arch not in ("decoder", "bigram"):
            raise InputError(f"lmforge harness model: got {type(model).__name__} (arch={arch!r}), expected a "
                             f"decoder language model")
        if tokenizer.bos_id is None and tokenizer.eos_id is None:
            raise InputError("lmforge harness model: the tokenizer has neither a bos nor an eos token; the harness "
                             "needs one to start empty contexts and rolling windows")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_length = _positive_int("max_length", max_length or model.config.context_length)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self._device = next(model.parameters()).device

    # ---- what the harness asks of a tokenizer-based model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.tokenizer.bos_id

    @property
    def prefix_token_id(self) -> int:
        """The token before an empty context and the first rolling window: bos, else eos (as ``hf``)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return "lmforge-" + self.tokenizer.fingerprint()[:16]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids of ``string``; ``add_special_tokens`` None runs the tokenizer's post-processor
        (if any) unless the text already starts with the bos token's text, as ``hf`` does."""
        bos = self.tokenizer.bos_id
        if add_special_tokens is None and bos is not None \
                and string.startswith(self.tokenizer.decode([bos], skip_special_tokens=False)):
            add_special_tokens = False  # the text brings its own bos
        ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else tokens, skip_special_tokens)

    # ---- loglikelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``[(request strings or None, context ids, continuation ids)]`` -> ``[(sum logprob, is_greedy)]``,
        longest first in batches of ``batch_size``, answers in the order asked."""
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][1]) - len(requests[i][2]),
                                                            tuple(requests[i][1] + requests[i][2])))
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="lmforge loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            scored = self._score_batch([requests[i][1] for i in batch], [requests[i][2] for i in batch])
            for i, answer in zip(batch, scored):
                answers[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(batch))
        bar.close()
        return answers

    @torch.no_grad()
    def _score_batch(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """One forward over right-padded ``context + continuation`` rows (the last token dropped,
        at most ``max_length`` tokens kept from the right) -> each continuation's (sum logprob, greedy)."""
        rows, cont_lens = [], []
        for ctx, cont in zip(contexts, continuations):
            if not cont:
                raise InputError("loglikelihood: a continuation encodes to no tokens; expected at least one")
            if len(cont) > self.max_length:
                raise InputError(f"loglikelihood: a continuation of {len(cont)} tokens is longer than the window "
                                 f"max_length={self.max_length}")
            rows.append((ctx + cont)[-(self.max_length + 1):][:-1])
            cont_lens.append(len(cont))
        T = max(map(len, rows))
        ids = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T): 1 on real tokens
        keep = torch.zeros(len(rows), T, dtype=torch.bool)  # (B, T): the positions that predict a continuation token
        for b, (row, n) in enumerate(zip(rows, cont_lens)):
            ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = 1
            keep[b, len(row) - n:len(row)] = True
        dev = self._device
        logits = self.model(ids.to(dev), attention_mask=mask.to(dev), keep=keep.to(dev))  # (N, V), rows in order
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
        targets = torch.tensor([t for cont in continuations for t in cont], device=dev)  # (N,)
        picked = logprobs.gather(1, targets[:, None])[:, 0]  # (N,)
        greedy = logprobs.argmax(-1) == targets  # (N,)
        out, at = [], 0
        for n in cont_lens:
            out.append((float(picked[at:at + n].sum()), bool(greedy[at:at + n].all())))
            at += n
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood, every token scored once over windows of ``max_length``."""
        windows, owner = [], []
        for r, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                                prefix_token=self.prefix_token_id,
                                                                max_seq_len=self.max_length, context_len=1):
                ctx, cont = lm_utils.make_disjoint_window((ctx, cont))
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, scores):
            totals[r] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Text after each context, cut before the first ``until`` string; requests with the same
        generation options go together, longest prompt first, ``batch_size`` at a time."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="lmforge generate_until")
        for members in groups.values():
            cfg = self._sampling_config(requests[members[0]].args[1])
            members.sort(key=lambda i: -len(self.tok_encode(requests[i].args[0])))
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                texts = generate_text(self.model, self.tokenizer, [requests[i].args[0] for i in batch], cfg)
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    def _sampling_config(self, gen_kwargs: dict) -> SamplingConfig:
        """A task's ``gen_kwargs`` as lmforge sampling options (greedy unless it asks ``do_sample``)."""
        if not isinstance(gen_kwargs, dict):
            raise InputError(f"generate_until: gen_kwargs got {type(gen_kwargs).__name__}, expected a dict")
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = [s for s in kw.pop("until") if isinstance(s, str) and s]
        max_gen_toks = kw.pop("max_gen_toks")
        do_sample = kw.pop("do_sample", False)
        temperature = float(kw.pop("temperature", 1.0) or 0.0)
        temperature = temperature if do_sample else 0.0  # the harness's greedy is do_sample false
        extra = {k: kw.pop(k) for k in _SAMPLING_KEYS if k in kw}
        if kw:
            raise InputError(f"generate_until: unknown generation option(s) {', '.join(sorted(kw))}; expected "
                             f"until, max_gen_toks, do_sample, temperature, {', '.join(_SAMPLING_KEYS)}")
        return SamplingConfig(max_new_tokens=int(max_gen_toks), temperature=temperature, stop=until, **extra)


def _usable_device(device: str | None) -> str:
    """``device``, except that the harness's command-line default ``cuda:0`` falls back to the CPU
    on a machine without CUDA (as its ``hf`` model does), with a note on stderr."""
    if not device:
        return "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        print(f"lmforge harness model: device {device!r} requested but CUDA is not available; using cpu",
              file=sys.stderr)
        return "cpu"
    return str(device)


def _positive_int(name: str, value) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(value, float) and value != n):
        raise InputError(f"lmforge harness model: {name} got {value!r}, expected a positive integer")
    return n


# ------------------------------------------------------------------------------ lmforge eval --harness
def evaluate_harness(model, tokenizer, tasks: Sequence[str], *, limit: int | None = None,
                     num_fewshot: int | None = None, batch_size: int = 8, include_path: str | None = None,
                     include_defaults: bool = True, seed: int = 0) -> dict:
    """Run harness ``tasks`` (names, or names defined by YAML files under ``include_path``) on a
    loaded lmforge model; returns the harness's results dict (``results`` holds each task's metrics).

    Indexing the harness's thousands of built-in task files takes tens of seconds, so when every
    task is found under ``include_path`` the built-in ones are not indexed at all;
    ``include_defaults=False`` never indexes them."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if num_fewshot is not None and num_fewshot < 0:
        raise InputError(f"--num-fewshot: got {num_fewshot}, expected an integer >= 0")
    if include_path is not None and not Path(include_path).is_dir():
        raise InputError(f"--include-path: {include_path} is not a folder; expected a folder of task YAML files")
    names = [t.strip() for t in tasks if t.strip()]
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if include_defaults and (manager is None or not all(manager.match_tasks([t]) for t in names)):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in names if manager is None or not manager.match_tasks([t])]
    if not names or unknown:
        raise InputError(f"--harness: unknown task(s) {', '.join(unknown) or '(none given)'}; expected harness "
                         f"task names (lm_eval ls tasks), or tasks from YAML files under --include-path")
    lm = LMForgeLM(model=model, tokenizer=tokenizer, batch_size=batch_size)
    return simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed)


def task_metrics(results: dict) -> dict:
    """``{task: {metric: value}}`` from a harness results dict (the ``,none`` filter suffix dropped)."""
    out = {}
    for task, metrics in results["results"].items():
        out[task] = {k.removesuffix(",none"): v for k, v in metrics.items() if k != "alias" and not isinstance(v, str)}
    return out


def write_results(results: dict, path: str | Path) -> Path:
    """The harness's whole results dict (metrics, task configs, versions) as JSON at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=lm_utils.handle_non_serializable), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lmforge.harness ...``: lm_eval's own command line with ``--model lmforge`` known."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
