"""lmforge.tasks.run: the one run pipeline (resume drops metric rows past the checkpoint, inference
refuses corrupt weights, disk full at start-up, a fresh run sets old checkpoints aside, the
end-of-run report)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from lmforge import from_pretrained
from lmforge.errors import CheckpointError
from lmforge.tasks import config_from_dict
from lmforge.tasks.run import run
from lmforge.train import checkpoint as ckpt
from lmforge.train.logging import read_metrics


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
        from tests.conftest import deep_merge

        return deep_merge(base, sections)

    return make


def quiet(*a, **k):
    pass


def _run(d):
    return run(config_from_dict(d), progress=False, print_fn=quiet)


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


os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


