"""The one run pipeline through the task registry: classification end to end (golden curve,
reports, checkpoint with its head, eval/classify verbs, exact resume, init_from, freezing), and
bad input that must fail with one clear line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lmforge import from_pretrained
from lmforge.tasks import config_from_dict
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.tasks import TASKS, get_task
from lmforge.train import checkpoint as ckpt
from lmforge.train.logging import read_metrics
from lmforge.tasks.run import run

from conftest import run_in_two_parts
from test_cli import lmforge


def cli(capsys, *args):
    """Run a verb in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from lmforge.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_cli_error(result, *needles):
    code, out, err = result
    assert code == 2 and "Traceback" not in err, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0], err
    for n in needles:
        assert n in lines[0], lines[0]

GOLDEN = Path(__file__).parent / "golden" / "classify_tiny.json"
POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]


def _sentiment_tsv(path: Path, n: int = 120, seed: int = 0, header: bool = True) -> Path:
    """Short texts whose label is the mood word they contain."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        word = rng.choice(POS if label == "pos" else NEG)
        rows.append(f"the {rng.choice(['film', 'song', 'day'])} was {word}\t{label}")
    path.write_text(("text\tlabel\n" if header else "") + "\n".join(rows) + "\n")
    return path


@pytest.fixture
def clf_dict(tiny_dict, tmp_path):
    data = _sentiment_tsv(tmp_path / "mood.tsv")

    def make(name="clf", **sections):
        base = tiny_dict(name, task="classify",
                         model={"context_length": 32},
                         objective={"max_length": 24},
                         data={"sources": [{"path": str(data)}], "val_fraction": 0.2, "test_fraction": 0.2},
                         train={"max_steps": 12, "batch_size": 8, "lr": 3e-3, "eval_every": 6,
                                "best_metric": "val_accuracy", "best_mode": "max", "eval_batch_size": 16})
        from conftest import deep_merge

        return deep_merge(base, sections)

    return make


def quiet(*a, **k):
    pass


def _run(d):
    return run(config_from_dict(d), progress=False, print_fn=quiet)


# ------------------------------------------------------------------------------ registry
def test_every_registered_task_has_options_and_a_builder():
    for name in TASKS:
        task = get_task(name)
        assert task.name == name and callable(task.build) and task.summary
        task.options()  # defaults construct


@pytest.mark.parametrize("bad,needle", [
    ({"task": "translate"}, "task: got 'translate'"),
    ({"task": "classify", "objective": {"max_len": 3}}, "objective.max_len: unknown key for task classify"),
    ({"task": "pretrain", "objective": {"mask_prob": 0.2}}, "objective.mask_prob: unknown key for task pretrain"),
    ({"train": {"eps": -1}}, "train.eps"),
    ({"train": {"checkpoint_every_hours": -1}}, "train.checkpoint_every_hours"),
    ({"train": {"trainable": "some"}}, "train.trainable"),
    ({"sample": {"temperature": -1}}, "sample.temperature"),
    ({"sample": {"top_p": 2}}, "sample.top_p"),
    ({"sample": {"top_k": 0}}, "sample.top_k"),
    ({"run": {"device": "bogus"}}, "run.device"),
    ({"model": {"init_from": "/nonexistent/model"}}, "model.init_from"),
])
def test_config_problems_name_the_users_key(tiny_dict, bad, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        config_from_dict({**tiny_dict(), **{k: {**tiny_dict().get(k, {}), **v} if isinstance(v, dict) else v
                                            for k, v in bad.items()}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error(tiny_dict):
    d = tiny_dict()
    d["run"]["device"] = "cuda"
    with pytest.raises(ConfigError, match="run.device: got 'cuda' but no CUDA device"):
        config_from_dict(d)


def test_out_dir_naming_a_file_is_a_config_error(tiny_dict, tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    d = tiny_dict()
    d["run"]["out_dir"] = str(f)
    with pytest.raises(ConfigError, match="run.out_dir"):
        config_from_dict(d)
    assert f.read_text() == "keep me"


# ------------------------------------------------------------------------------ classification
def test_classification_end_to_end(clf_dict, tmp_path):
    s = _run(clf_dict())
    run_dir = Path(s["run_dir"])
    losses = [h["loss"] for h in s["history"]]
    # golden curve: regenerate with LMFORGE_UPDATE_GOLDEN=1 (and commit the file) after a deliberate change
    import os

    if os.environ.get("LMFORGE_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"description": "tests/test_pipeline.py::test_classification_end_to_end",
                                      "torch": torch.__version__, "losses": losses}, indent=1) + "\n")
    assert GOLDEN.is_file(), "no golden curve: run with LMFORGE_UPDATE_GOLDEN=1 once and commit it"
    assert losses == pytest.approx(json.loads(GOLDEN.read_text())["losses"], abs=2e-4)
    rep = s["reports"]
    assert set(rep) == {"val", "test"} and rep["test"]["examples"] == 24
    assert rep["test"]["labels"] == ["neg", "pos"] and len(rep["test"]["confusion_matrix"]) == 2
    for f in ("eval_report.json", "confusion_matrix_val.png", "confusion_matrix_test.png", "training_curves.png",
              "config.yaml", "run_info.json"):
        assert (run_dir / f).is_file(), f
    val_rows = [r for r in read_metrics(run_dir) if r["split"] == "val"]
    assert {"loss", "accuracy", "macro_f1"} <= set(val_rows[-1])

    # the best checkpoint reloads with its head through from_pretrained
    model, tok = from_pretrained(run_dir / "checkpoints" / "best", with_tokenizer=True)
    assert model.config.num_classes == 2 and model.config.labels == ["neg", "pos"]
    ids = torch.tensor([tok.encode("the day was good")])
    assert model(ids, torch.ones_like(ids), head="cls").shape == (1, 2)


def test_classifier_learns_the_task(clf_dict):
    s = _run(clf_dict(train={"max_steps": 60, "eval_every": 30, "lr": 5e-3}))
    assert s["reports"]["test"]["accuracy"] >= 0.9


def test_exact_resume_for_classification(clf_dict):
    n = 4
    sections = dict(model={"dropout": 0.1}, train={"max_steps": 2 * n, "eval_every": 100})
    straight = _run(clf_dict("straight", **sections))
    first, second = run_in_two_parts(lambda: config_from_dict(clf_dict("resumed", **sections)), n)
    got = [h["loss"] for h in first["history"]] + [h["loss"] for h in second["history"]]
    assert got == pytest.approx([h["loss"] for h in straight["history"]], abs=1e-6)
    a = from_pretrained(straight["last_checkpoint"]).state_dict()
    b = from_pretrained(second["last_checkpoint"]).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    # the resumed run's metrics hold each step once (rows past the checkpoint are dropped)
    steps = [r["step"] for r in read_metrics(Path(second["run_dir"])) if r["split"] == "train"]
    assert steps == sorted(set(steps))


def test_resume_drops_metric_rows_past_the_checkpoint(clf_dict):
    d = clf_dict("again", train={"max_steps": 4, "checkpoint_every": 2, "eval_every": 100})
    s = _run(d)
    run_dir = Path(s["run_dir"])
    # simulate a crash after step 4's rows were logged but only step 2's checkpoint survived
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / ckpt.step_name(4))
    _run(d)
    steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_init_from_a_pretrained_decoder_adds_a_head_and_freezes(tiny_dict, clf_dict):
    pre = _run(tiny_dict("pre", train={"max_steps": 3, "checkpoint_every": 3}))
    s = _run(clf_dict(model={"init_from": pre["run_dir"]}, tokenizer={"kind": "char"},
                      train={"trainable": "last_blocks:1", "max_steps": 3, "eval_every": 3}))
    base = from_pretrained(pre["last_checkpoint"]).state_dict()
    tuned = from_pretrained(s["last_checkpoint"]).state_dict()
    torch.testing.assert_close(tuned["transformer.tok_emb.weight"], base["transformer.tok_emb.weight"])  # frozen
    block = [k for k in base if k.startswith("transformer.blocks.0.") and k.endswith("weight")]
    assert any(not torch.equal(tuned[k], base[k]) for k in block)  # the last (only) block trained
    assert "classifier.out.weight" in tuned and "classifier.out.weight" not in base


def test_head_trainable_only_moves_the_classifier(clf_dict):
    from lmforge.train.freeze import apply_trainable

    s = _run(clf_dict(train={"trainable": "head", "max_steps": 3, "eval_every": 3}))
    model = from_pretrained(s["last_checkpoint"])
    trainable, total = apply_trainable(model, "head")
    assert trainable == sum(p.numel() for p in model.classifier.parameters()) < total


# ------------------------------------------------------------------------------ CLI
def test_eval_and_classify_verbs(clf_dict, tmp_path, capsys):
    s = _run(clf_dict(train={"max_steps": 40, "eval_every": 20, "lr": 5e-3}))
    data = _sentiment_tsv(tmp_path / "held.tsv", n=20, seed=9)
    r = lmforge("eval", "--model", s["run_dir"], "--data", data, cwd=tmp_path)  # one real process, end to end
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["examples"] == 20 and 0 <= out["accuracy"] <= 1 and len(out["confusion_matrix"]) == 2
    code, stdout, err = cli(capsys, "classify", "--model", s["run_dir"], "--text", "the song was great")
    assert code == 0, err
    row = json.loads(stdout)
    assert row["label"] in ("neg", "pos") and sum(row["probs"].values()) == pytest.approx(1, abs=1e-4)
    texts = tmp_path / "texts.txt"
    texts.write_text("the day was bad\nthe film was nice\n")
    code, stdout, _ = cli(capsys, "classify", "--model", s["run_dir"], "--input", texts)
    assert code == 0 and len(stdout.splitlines()) == 2

    # bad input: an unseen label, a missing label field, a zero batch count, no text given
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nthe day was good\tmeh\n")
    best = Path(s["run_dir"]) / "checkpoints" / "best"  # a checkpoint: no run-folder note on stderr
    assert_cli_error(cli(capsys, "eval", "--model", best, "--data", bad), "never seen")
    assert_cli_error(cli(capsys, "eval", "--model", best, "--data", data, "--label-field", "mood"),
                     "no label field 'mood'")
    assert_cli_error(cli(capsys, "eval", "--model", best, "--data", data, "--max-batches", "0"),
                     "--max-batches")
    assert_cli_error(cli(capsys, "classify", "--model", best), "--text")


# ------------------------------------------------------------------------------ bad input
def test_single_class_training_data_is_an_error(clf_dict, tmp_path):
    one = tmp_path / "one.tsv"
    one.write_text("text\tlabel\n" + "".join(f"x{i}\tpos\n" for i in range(20)))
    d = clf_dict(data={"sources": [{"path": str(one)}]})
    with pytest.raises(DataError, match="only one label"):
        _run(d)


def test_missing_label_field_and_non_string_text(clf_dict, tmp_path):
    with pytest.raises(DataError, match="no label field 'mood'"):
        _run(clf_dict(objective={"label_field": "mood"}))
    p = tmp_path / "nums.jsonl"
    p.write_text("".join(json.dumps({"text": i, "label": i % 2}) + "\n" for i in range(20)))
    with pytest.raises(DataError, match="text field 'text' is int"):
        _run(clf_dict(data={"sources": [{"path": str(p)}]}))


def test_header_only_file_is_an_error(clf_dict, tmp_path):
    p = tmp_path / "empty.tsv"
    p.write_text("text\tlabel\n")
    with pytest.raises(DataError, match="no records found"):
        _run(clf_dict(data={"sources": [{"path": str(p)}]}))


def test_cls_pooling_on_a_decoder_is_an_error(clf_dict):
    with pytest.raises(ConfigError, match="pooling: 'cls' on a causal decoder"):
        config_from_dict(clf_dict(objective={"pooling": "cls"}))


def test_init_from_with_another_vocabulary_is_an_error(tiny_dict, clf_dict, tmp_path):
    pre = _run(tiny_dict("pre2", train={"max_steps": 1}))
    from lmforge.tokenizer import ByteTokenizer

    big = tmp_path / "byte.json"
    ByteTokenizer().save(big)
    with pytest.raises(ConfigError, match="vocab_size"):
        _run(clf_dict(model={"init_from": pre["run_dir"]}, tokenizer={"kind": "file", "path": str(big)}))


def test_init_from_cannot_change_the_architecture(tiny_dict, clf_dict):
    pre = _run(tiny_dict("pre3", train={"max_steps": 1}))
    with pytest.raises(ConfigError, match="model.n_layer: cannot change when model.init_from is set"):
        _run(clf_dict(model={"init_from": pre["run_dir"], "n_layer": 3}))


def test_inference_refuses_corrupt_weights_and_a_swapped_tokenizer(tiny_dict, tmp_path, capsys):
    s = _run(tiny_dict("c", train={"max_steps": 2, "checkpoint_every": 1, "keep_last": 2}))
    root = Path(s["run_dir"]) / "checkpoints"
    first, last = root / ckpt.step_name(1), root / ckpt.step_name(2)
    w = last / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-20] ^= 0xFF
    w.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256|checksum|corrupt"):
        from_pretrained(last)
    for verb in (["eval", "--model", last, "--data", "builtin:stories"], ["generate", "--model", last],
                 ["info", last]):
        code, out, err = cli(capsys, *verb)
        assert code == 2 and not out, (verb, err)
        assert_cli_error((code, out, err), "sha256")

    # a plain model folder (no meta.json) whose tokenizer.json was swapped for another of the same size
    from lmforge.store import save_model
    from lmforge.tokenizer import CharTokenizer

    model, tok = from_pretrained(first, with_tokenizer=True)
    folder = save_model(model, tmp_path / "plain", tokenizer=tok)
    (folder / "checksums.json").unlink()  # with it the swap is a checksum mismatch; without, the fingerprint
    chars = [tok.id_to_token(i) for i in range(tok.vocab_size) if tok.id_to_token(i) not in tok.special_tokens]
    other = CharTokenizer(chars[:-1] + ["\u00e9"])  # one character swapped: same size, other ids
    assert other.vocab_size == tok.vocab_size
    other.save(folder / "tokenizer.json")
    with pytest.raises(CheckpointError, match="not the one the model was trained with"):
        from_pretrained(folder, with_tokenizer=True)


def test_disk_full_at_start_up_is_one_clear_error(clf_dict, monkeypatch):
    import errno

    import lmforge.train.logging as logging_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logging_mod, "atomic_write", full)
    with pytest.raises(CheckpointError, match="disk full while preparing run folder"):
        _run(clf_dict())


def test_the_curve_plotter_dies_with_its_parent(tmp_path):
    """A SIGKILLed trainer leaves no plotting process behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'lmforge.inspect.plots', r'{tmp_path / 'metrics.jsonl'}', "
        f"r'{tmp_path / 'c.png'}'], stdin=subprocess.PIPE)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
        try:  # reap it if it became our zombie (it does not: init adopts it)
            os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pass
    os.kill(child, signal.SIGKILL)
    pytest.fail("the plotter outlived its parent by more than 20 s")


def test_a_fresh_run_sets_an_earlier_runs_checkpoints_aside(clf_dict):
    d = clf_dict("twice", train={"max_steps": 2, "eval_every": 2})
    first = _run(d)
    d["train"]["resume"] = "never"
    second = _run(d)
    run_dir = Path(second["run_dir"])
    asides = list(run_dir.glob("checkpoints.*"))
    assert len(asides) == 1 and (asides[0] / ckpt.step_name(2)).is_dir()
    assert [h["step"] for h in second["history"]] == [1, 2] and first["steps"] == 2
    assert len(list(run_dir.glob("metrics.*.jsonl"))) == 1


def test_the_end_of_a_run_writes_its_report(clf_dict):
    s = _run(clf_dict("reported", logging={"report": True}, train={"max_steps": 2, "eval_every": 2}))
    html = (Path(s["run_dir"]) / "report.html").read_text()
    assert "val_accuracy" in html or "accuracy" in html
    assert "http://" not in html and "https://" not in html
