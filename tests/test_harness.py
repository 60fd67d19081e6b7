"""lm-evaluation-harness on lmforge models (lmforge.harness), offline: two tasks read local JSONL
files (a multiple-choice and a generate_until arithmetic task); the oracle is the harness's own
``hf`` model (HFLM) on the same weights exported with ``export_hf``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lmforge.cli import main as cli_main  # noqa: E402
from lmforge.errors import InputError  # noqa: E402
from lmforge.generate import generate_text  # noqa: E402
from lmforge.harness import LMForgeLM, evaluate_harness  # noqa: E402
from lmforge.interop.hf import export_hf  # noqa: E402
from lmforge.model import ModelConfig, build  # noqa: E402
from lmforge.store import save_model  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

WINDOW = 32  # the model's context_length: rolling windows and truncation happen at this length
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PROBLEMS = [(a, b) for a in range(2, 9, 3) for b in range(1, 9, 2)]  # 12 sums


def _write_tasks(root: Path) -> Path:
    """Two arithmetic tasks on local JSONL files: multiple choice (acc) and generation (exact_match)."""
    data = root / "data"
    data.mkdir()
    mc, gen = [], []
    for i, (a, b) in enumerate(PROBLEMS):
        choices = [str(a + b + d) for d in (-1, 0, 1, 2)]
        label = (i % 4)
        choices[0], choices[label] = choices[label], choices[0]  # the right answer at position label
        mc.append({"question": f"What is {a} + {b}?", "choices": choices, "label": choices.index(str(a + b))})
        gen.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
    for name, rows in (("mc", mc), ("gen", gen)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {{path}}\n"
              f"  cache_dir: {root / 'hf_datasets'}\ntest_split: test\n")
    (tasks / "lmf_arith_mc.yaml").write_text(
        "task: lmf_arith_mc\n" + common.format(path=data / "mc.jsonl") +
        "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    (tasks / "lmf_arith_gen.yaml").write_text(
        "task: lmf_arith_gen\n" + common.format(path=data / "gen.jsonl") +
        "output_type: generate_until\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \" {{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return tasks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama-style lmforge decoder with a BPE tokenizer: its lmforge folder, its
    Hugging Face export, and the task folder."""
    root = tmp_path_factory.mktemp("harness")
    corpus = [f"Question: What is {a} + {b}?\nAnswer: {a + b}\n" for a in range(10) for b in range(10)]
    tok = train_tokenizer("bpe", corpus, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = build(ModelConfig(arch="decoder", vocab_size=tok.vocab_size, context_length=WINDOW, n_layer=2,
                              n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64, activation="swiglu",
                              norm="rmsnorm", positional="rope", bias=False, tie_embeddings=False))
    with torch.no_grad():  # sharper than the init's near-uniform distributions
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    folder = save_model(model, root / "lmforge", tokenizer=tok)
    hf_folder = export_hf(model, root / "hf", tokenizer=tok)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        yield {"root": root, "folder": folder, "hf": hf_folder, "tasks": _write_tasks(root)}


@pytest.fixture(scope="module")
def models(tiny):
    from lm_eval.models.huggingface import HFLM

    ours = LMForgeLM(model=str(tiny["folder"]), batch_size=3)
    ref = HFLM(pretrained=str(tiny["hf"]), device="cpu", dtype="float32", batch_size=4, max_length=WINDOW)
    return ours, ref


def _task_instances(tiny, name: str, limit: int) -> list[Instance]:
    manager = TaskManager(include_path=str(tiny["tasks"]), include_defaults=False)  # not the 24 s index of all
    task = manager.load([name])["tasks"][name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [inst for inst in task.instances]


def _assert_close(got, want, what: str) -> None:
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        assert abs(g[0] - w[0]) <= 1e-4, (what, g, w)
        assert g[1] == w[1], (what, g, w)


def test_loglikelihood_equals_the_harness_hf_model(tiny, models):
    ours, ref = models
    reqs = _task_instances(tiny, "lmf_arith_mc", limit=6)  # 6 questions x 4 choices, as the task asks them
    assert len(reqs) == 24 and all(r.request_type == "loglikelihood" for r in reqs)
    edge = [("", "Answer: 5"),  # empty context: the prefix (bos) token stands in
            ("Question: What is 3 + 4?\nAnswer: ", "7"),  # trailing space moves to the continuation
            ("Question: What is 1 + 1?\n" * 4 + "Answer:", " 2\nQuestion"),  # longer than the window
            ("Q", "uestion: What is 2 + 2?")]
    reqs += [Instance("loglikelihood", {}, args, i) for i, args in enumerate(edge)]
    got, want = ours.loglikelihood(reqs), ref.loglikelihood(reqs)
    _assert_close(got, want, "loglikelihood")
    assert len({round(g[0], 3) for g in got}) > len(got) // 2  # real, differing scores


def test_is_greedy_is_true_for_the_models_own_greedy_tokens(models):
    """At the token level (the harness's _loglikelihood_tokens): lmforge's greedy ids are greedy."""
    from lmforge.generate import generate

    ours, ref = models
    ids = ours.tok_encode("Question: What is 5 + 3?\nAnswer:")
    greedy = generate(ours.model, ids, temperature=0, max_new_tokens=4)
    other = greedy[:-1] + [(greedy[-1] + 1) % ours.model.config.vocab_size]  # last token not the argmax
    reqs = [(None, ids, greedy), (None, ids, other), (None, ids, greedy[:1])]
    got, want = ours._loglikelihood_tokens(reqs), ref._loglikelihood_tokens(reqs)
    _assert_close(got, want, "token-level loglikelihood")
    assert [g[1] for g in got] == [True, False, True]


def test_rolling_loglikelihood_equals_the_harness_hf_model(tiny, models):
    ours, ref = models
    texts = ["Question: What is 3 + 4?\nAnswer: 7\n" * 8,  # ~104 tokens: 4 windows of 32
             "Question: What is 2 + 2?",  # one window
             "".join(f"{a} + {a} = {2 * a}. " for a in range(12))]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert len(ours.tok_encode(texts[0])) > 3 * WINDOW
    got, want = ours.loglikelihood_rolling(reqs), ref.loglikelihood_rolling(reqs)
    assert got == pytest.approx(want, abs=1e-4)
    # one window: the sum over the text's tokens after the bos prefix, computed here by hand
    ids = [ours.prefix_token_id] + ours.tok_encode(texts[1])
    with torch.no_grad():
        logp = torch.log_softmax(ours.model(torch.tensor([ids])), -1)[0]  # (T, V)
    by_hand = sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
    assert got[1] == pytest.approx(by_hand, abs=1e-4)


def test_generate_until_gives_lmforge_greedy_text(tiny, models):
    ours, ref = models
    reqs = _task_instances(tiny, "lmf_arith_gen", limit=5)
    assert all(r.request_type == "generate_until" for r in reqs)
    got = ours.generate_until(reqs)
    contexts = [r.args[0] for r in reqs]
    want = generate_text(ours.model, ours.tokenizer, contexts, temperature=0, max_new_tokens=6, stop=["\n"])
    assert got == want
    assert got == ref.generate_until(reqs)  # and the harness's hf model generates the same
    assert all("\n" not in g for g in got) and any(got)


def test_generate_until_refuses_an_unknown_generation_option(tiny, models):
    ours, _ = models
    req = Instance("generate_until", {}, ("Question:", {"until": ["\n"], "num_beams": 4}), 0)
    with pytest.raises(InputError, match="num_beams"):
        ours.generate_until([req])


def test_task_generation_options_become_lmforge_sampling_options(models):
    ours, _ = models
    greedy = ours._sampling_config({"until": "\n\n", "do_sample": False, "temperature": 0.7})
    assert (greedy.temperature, list(greedy.stop), greedy.max_new_tokens) == (0.0, ["\n\n"], ours.max_gen_toks)
    assert ours._sampling_config({"until": []}).temperature == 0.0  # greedy unless asked
    assert ours._sampling_config({"temperature": 0.5}).temperature == 0.5  # a temperature alone samples (harness rule)
    sampled = ours._sampling_config({"until": ["Q:", ""], "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                     "max_new_tokens": 5, "seed": 3})
    assert (sampled.temperature, sampled.top_p, sampled.seed) == (0.7, 0.9, 3)
    assert (list(sampled.stop), sampled.max_new_tokens) == (["Q:"], 5)


def test_a_bigram_model_scores_each_token_from_its_table(tiny, models):
    ours, _ = models
    torch.manual_seed(1)
    bigram = build({"arch": "bigram", "vocab_size": ours.model.config.vocab_size, "context_length": WINDOW})
    lm = LMForgeLM(model=bigram, tokenizer=ours.tokenizer, batch_size=2)
    ctx, cont = ours.tok_encode("What is 2 + 2?"), ours.tok_encode(" 4\nQuestion")
    table = torch.log_softmax(bigram.table.weight.detach(), -1)  # (V, V): row = previous token
    ids = ctx + cont
    by_hand = sum(float(table[ids[i - 1], ids[i]]) for i in range(len(ctx), len(ids)))
    (got, _), = lm._loglikelihood_tokens([(None, ctx, cont)])
    assert got == pytest.approx(by_hand, abs=1e-4)


def _expected_metrics(tiny, models, limit: int) -> dict:
    """acc and exact_match computed here from the hf model's answers (the oracle)."""
    _, ref = models
    docs = [json.loads(line) for line in (tiny["root"] / "data" / "mc.jsonl").read_text().splitlines()][:limit]
    right = 0
    for d in docs:
        ctx = f"Question: {d['question']}\nAnswer:"
        scores = ref.loglikelihood([Instance("loglikelihood", {}, (ctx, " " + c), i)
                                    for i, c in enumerate(d["choices"])])
        right += max(range(len(scores)), key=lambda i: scores[i][0]) == d["label"]
    gen = _task_instances(tiny, "lmf_arith_gen", limit=limit)
    said = ref.generate_until(gen)
    hits = sum(s.strip() == r.doc["answer"] for s, r in zip(said, gen))
    return {"acc": right / limit, "exact_match": hits / limit}


def test_lmforge_eval_harness_prints_the_metrics_and_writes_output(tiny, models, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = cli_main(["eval", "--harness", "lmf_arith_mc,lmf_arith_gen", "--model", str(tiny["folder"]),
                   "--include-path", str(tiny["tasks"]), "--limit", "8", "--batch-size", "4",
                   "--num-fewshot", "0", "--output", str(out)])
    assert rc == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    printed = json.loads(lines[0])
    expected = _expected_metrics(tiny, models, limit=8)
    assert printed["lmf_arith_mc"]["acc"] == pytest.approx(expected["acc"], abs=1e-5)
    assert printed["lmf_arith_gen"]["exact_match"] == pytest.approx(expected["exact_match"], abs=1e-5)
    saved = json.loads(out.read_text())
    assert saved["results"]["lmf_arith_mc"]["acc,none"] == pytest.approx(expected["acc"])
    assert saved["n-samples"]["lmf_arith_mc"]["effective"] == 8


def test_harness_input_errors(tiny, models, capsys):
    ours, _ = models
    with pytest.raises(InputError, match="unknown task"):
        evaluate_harness(ours.model, ours.tokenizer, ["no_such_task_xyz"], include_path=str(tiny["tasks"]),
                         include_defaults=False)
    with pytest.raises(InputError, match="num-fewshot"):
        evaluate_harness(ours.model, ours.tokenizer, ["lmf_arith_mc"], num_fewshot=-1)
    with pytest.raises(InputError, match="batch_size"):
        LMForgeLM(model=ours.model, tokenizer=ours.tokenizer, batch_size="auto")
    assert cli_main(["eval", "--model", str(tiny["folder"])]) == 2  # neither --data nor --harness
    assert "--harness" in capsys.readouterr().err


def test_eval_harness_without_lm_eval_installed_says_what_to_install(tiny, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "lmforge.harness")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ModuleNotFoundError
    assert cli_main(["eval", "--harness", "lmf_arith_mc", "--model", str(tiny["folder"])]) == 2
    assert "pip install 'lmforge[harness]'" in capsys.readouterr().err


@pytest.mark.slow  # lm_eval's command line indexes all its built-in tasks first (~25 s on 2 busy cores)
def test_lm_eval_command_line_runs_the_lmforge_model(tiny, tmp_path):
    """``python -m lmforge.harness`` is lm_eval's own command line with ``--model lmforge`` registered."""
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "lmforge.harness", "--model", "lmforge",
                        "--model_args", f"model={tiny['folder']}", "--tasks", "lmf_arith_mc",
                        "--include_path", str(tiny["tasks"]), "--limit", "4", "--batch_size", "4",
                        "--output_path", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = list((tmp_path / "out").rglob("results_*.json"))
    assert len(saved) == 1
    result = json.loads(saved[0].read_text())
    assert result["config"]["model"] == "lmforge" and "acc,none" in result["results"]["lmf_arith_mc"]
