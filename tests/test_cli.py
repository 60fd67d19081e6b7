"""``lmforge <verb>`` in a real subprocess: help in sync with the VERBS table, one-line errors with
exit code 2 on bad input, and a tiny pretrain -> eval -> generate round trip."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge.cli import VERBS, build_parser


def lmforge(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "error" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def _subcommand_paths(parser: argparse.ArgumentParser, prefix=()) -> list[tuple[str, ...]]:
    """Every verb and nested action (``("tokenizer", "train")``) the parser knows."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append(prefix + (name,))
                out += _subcommand_paths(sub, prefix + (name,))
    return out


# ----------------------------------------------------------------------------- help
def test_help_lists_every_verb(tmp_path):
    r = lmforge("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for verb, (fn, _, help_) in VERBS.items():
        assert verb in r.stdout, verb
        assert help_ in " ".join(r.stdout.split()), help_
        assert callable(fn)


def test_parser_and_table_agree():
    verbs = [p[0] for p in _subcommand_paths(build_parser()) if len(p) == 1]
    assert verbs == list(VERBS)


def test_no_verb_is_a_usage_error(tmp_path):
    r = lmforge(cwd=tmp_path)
    assert r.returncode == 2 and "usage" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("path", _subcommand_paths(build_parser()), ids=lambda p: " ".join(p))
def test_every_verb_has_help(path, tmp_path):
    r = lmforge(*path, "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: lmforge " + " ".join(path))


# ----------------------------------------------------------------------------- a tiny trained model
@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_dict):
    """A tiny run through ``lmforge pretrain``; returns (folder, final checkpoint, completed process)."""
    root = tmp_path_factory.mktemp("cli")
    cfg = run_dict(root / "run", train={"max_steps": 4, "eval_every": 4})
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = lmforge("pretrain", "-c", "cfg.yaml", "--quiet", "train.lr=2e-3", cwd=root)
    last = root / "run" / "checkpoints" / "step_00000004"
    return root, last, r


def test_pretrain_through_the_cli(trained):
    root, last, r = trained
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "final: val_loss" in r.stdout
    from lmforge.train.checkpoint import verify_checkpoint

    verify_checkpoint(last)
    saved = yaml.safe_load((root / "run" / "config.yaml").read_text())
    assert saved["train"]["lr"] == 2e-3  # the override reached the run


def test_eval_prints_loss_and_ppl(trained, tmp_path):
    _, last, r = trained
    assert r.returncode == 0, r.stderr[-3000:]
    from lmforge.data.builtin import builtin_documents

    data = tmp_path / "held_out.txt"
    data.write_text("\n\n".join(builtin_documents("stories", 30, seed=7)))
    r = lmforge("eval", "--model", last, "--data", data, "--quiet", "--cache-dir", tmp_path / "cache",
                "--max-batches", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert math.isfinite(out["loss"]) and 0 < out["loss"] < 10
    assert out["ppl"] == pytest.approx(math.exp(out["loss"]), rel=1e-4)  # both rounded to 5 significant digits


def test_generate_prints_text(trained, tmp_path):
    pytest.importorskip("lmforge.generate")
    _, last, r = trained
    assert r.returncode == 0, r.stderr[-3000:]
    r = lmforge("generate", "--model", last, "--prompt", "Once", "--max-new-tokens", "20", "--seed", "0",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert r.stdout.startswith("Once") and len(r.stdout.rstrip("\n")) > len("Once")


def test_generate_quantized_weights(trained, tmp_path):
    _, last, r = trained
    assert r.returncode == 0, r.stderr[-3000:]
    args = ("generate", "--model", last, "--prompt", "Once", "--max-new-tokens", "12", "--temperature", "0")
    fp32 = lmforge(*args, cwd=tmp_path)
    fp16 = lmforge(*args, "--quantize", "fp16", cwd=tmp_path)
    int8 = lmforge(*args, "--quantize", "int8", cwd=tmp_path)
    int4 = lmforge(*args, "--quantize", "int4", cwd=tmp_path)
    assert fp32.returncode == fp16.returncode == int8.returncode == int4.returncode == 0, \
        (fp16.stderr[-2000:], int8.stderr[-2000:], int4.stderr[-2000:])
    assert fp16.stdout == fp32.stdout  # greedy, same tokens
    for q in (int8, int4):
        assert q.stdout.startswith("Once") and len(q.stdout.strip()) > len("Once")
    bad = lmforge(*args, "--quantize", "int3", cwd=tmp_path)  # an argparse usage error, like any bad choice
    assert bad.returncode == 2 and "invalid choice: 'int3'" in bad.stderr and "Traceback" not in bad.stderr


def test_generate_with_corrupt_weights(trained, tmp_path):
    _, last, r = trained
    assert r.returncode == 0, r.stderr[-3000:]
    broken = tmp_path / "broken"
    shutil.copytree(last, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    r = lmforge("generate", "--model", broken, "--prompt", "hi", cwd=tmp_path)
    assert_one_line_error(r, "model.safetensors")


# ----------------------------------------------------------------------------- info / tokenizer
def test_info_of_a_preset(tmp_path):
    import torch

    from lmforge.model import build, count_parameters, flops_per_token

    with torch.device("meta"):
        model = build("baby")
    r = lmforge("info", "baby", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{count_parameters(model):,}" in r.stdout
    assert "FLOPs/token" in r.stdout
    assert f"{flops_per_token(model.config):,.0f}" in r.stdout


def test_tokenizer_train_and_encode(tmp_path):
    from lmforge.data.builtin import builtin_documents
    from lmforge.tokenizer import load_tokenizer

    (tmp_path / "corpus.txt").write_text("\n\n".join(builtin_documents("stories", 100, seed=1)))
    r = lmforge("tokenizer", "train", "--input", "corpus.txt", "--vocab-size", "300", "--out", "tok.json",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "tok.json" in r.stdout
    tok = load_tokenizer(tmp_path / "tok.json")
    assert 0 < tok.vocab_size <= 300
    assert tok.decode(tok.encode("Once upon a time")) == "Once upon a time"
    r = lmforge("tokenizer", "encode", "--tokenizer", "tok.json", "--text", "Once upon a time", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["decoded"] == "Once upon a time"


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def cfg_yaml(tiny_yaml):
    return tiny_yaml("cfg", train={"max_steps": 2})


def test_info_of_nothing(tmp_path):
    assert_one_line_error(lmforge("info", "no-such-preset-or-path", cwd=tmp_path), "no-such-preset-or-path")


def test_pretrain_missing_config(tmp_path):
    assert_one_line_error(lmforge("pretrain", "-c", "missing.yaml", cwd=tmp_path), "missing.yaml")


def test_pretrain_negative_lr(cfg_yaml, tmp_path):
    r = lmforge("pretrain", "-c", cfg_yaml, "train.lr=-1", cwd=tmp_path)
    assert_one_line_error(r, "train.lr")
    assert not (tmp_path / "cfg").exists()  # nothing was started


def test_pretrain_unknown_key(cfg_yaml, tmp_path):
    assert_one_line_error(lmforge("pretrain", "-c", cfg_yaml, "train.nonsense=1", cwd=tmp_path), "train.nonsense")


def test_generate_missing_model(tmp_path):
    assert_one_line_error(lmforge("generate", "--model", "/nonexistent", "--prompt", "hi", cwd=tmp_path),
                          "/nonexistent")


def test_tokenizer_train_missing_input(tmp_path):
    r = lmforge("tokenizer", "train", "--input", "missing.txt", "--vocab-size", "300", "--out", "x.json",
                cwd=tmp_path)
    assert_one_line_error(r, "missing.txt")
    assert not (tmp_path / "x.json").exists()


def _save_tiny(folder: Path, **fields) -> Path:
    from lmforge.model import build
    from lmforge.store import save_model

    model = build({"vocab_size": 40, "context_length": 16, "n_layer": 1, "n_head": 2, "n_embd": 16, **fields})
    return save_model(model, folder)


@pytest.mark.parametrize("fields, needle", [
    ({"arch": "encoder", "mlm_head": True}, "model.arch"),
    ({"arch": "decoder", "bias": False}, "model.bias"),  # GPT-2 layout without biases has no HF twin
], ids=["encoder", "gpt2-without-bias"])
def test_export_refuses_what_hf_cannot_hold(fields, needle, tmp_path):
    pytest.importorskip("lmforge.interop.hf")
    folder = _save_tiny(tmp_path / "model", **fields)
    r = lmforge("export", "--model", folder, "--out", "hf_out", cwd=tmp_path)
    assert_one_line_error(r, needle)
    assert not (tmp_path / "hf_out").exists()


# ----------------------------------------------------------------------------- a newcomer's first hour
def test_version(tmp_path):
    from lmforge import __version__

    r = lmforge("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"lmforge {__version__}"


def test_presets_lists_every_preset_and_recipe_with_one_line(tmp_path):
    from lmforge.model import PRESETS

    repo_configs = Path(__file__).resolve().parents[1] / "configs"
    r = lmforge("presets", "--configs", repo_configs, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in PRESETS:
        row = next(line for line in lines if line.split()[:1] == [name])
        assert "parameters" in row and "context" in row or name == "bigram", row
    for recipe in sorted(repo_configs.glob("*.yaml")):
        row = next(line for line in lines if line.split()[:1] == [recipe.name])
        assert "no description" not in row and len(row.split()) > 3, row
    baby = next(line for line in lines if line.split()[:1] == ["baby"])
    assert "GPT-2 style: 4 layers, 4 heads, width 128" in baby
    r = lmforge("presets", "--json", "--configs", repo_configs, cwd=tmp_path)
    assert set(json.loads(r.stdout)["presets"]) == set(PRESETS)


def test_generate_takes_a_run_folder_and_says_which_checkpoint(trained, tmp_path):
    root, last, r = trained
    assert r.returncode == 0, r.stderr[-3000:]
    r = lmforge("generate", "--model", root / "run", "--prompt", "Once", "--max-new-tokens", "5", "--seed", "0",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is a run folder; using its best checkpoint" in r.stderr and "checkpoints/best" in r.stderr
    assert r.stdout.startswith("Once")


def test_a_run_folder_without_checkpoints_is_one_line(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {name: x}\n")
    assert_one_line_error(lmforge("generate", "--model", run, cwd=tmp_path), "run folder without a complete checkpoint")


def test_generate_crops_learned_positions_past_the_context(trained, tmp_path):
    _, last, r = trained
    assert r.returncode == 0, r.stderr[-3000:]
    # the tiny model has context 32: 60 new tokens run past it and are cropped, not refused
    r = lmforge("generate", "--model", last, "--prompt", "Once", "--max-new-tokens", "60", "--temperature", "0",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r2 = lmforge("generate", "--model", last, "--prompt", "Once", "--max-new-tokens", "60",
                 "--context-overflow", "error", cwd=tmp_path)
    assert_one_line_error(r2, "context_length 32")
    assert r2.stdout == ""  # the prompt is not echoed before the request is refused


@pytest.mark.parametrize("flags, needle", [
    (["--top-p", "2"], "--top-p: got 2.0"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
    (["--device", "bogus"], "--device: unknown device 'bogus'"),
    (["--device", "cuda:99"], "--device: 'cuda:99' requested"),
], ids=["top-p", "temperature", "top-k", "bogus-device", "missing-gpu"])
def test_generate_validates_options_before_printing_anything(trained, tmp_path, flags, needle):
    _, last, r = trained
    assert r.returncode == 0, r.stderr[-3000:]
    r = lmforge("generate", "--model", last, "--prompt", "ECHO?", *flags, cwd=tmp_path)
    assert_one_line_error(r, needle)
    assert r.stdout == ""


def test_info_of_a_checkpoint_shows_its_step_and_best_metric(trained, tmp_path):
    root, last, r = trained
    assert r.returncode == 0, r.stderr[-3000:]
    r = lmforge("info", last, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{last}: step 4 (loss " in r.stdout
    assert "best of the run       val_loss " in r.stdout and "at step 4" in r.stdout
    r = lmforge("info", root / "run", "--json", cwd=tmp_path)  # a run folder: its best checkpoint
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)["checkpoint"]
    assert facts["step"] == 4 and facts["best_metric"] == "val_loss" and facts["best_step"] == 4
    assert facts["best"] == pytest.approx(facts["metrics"]["val_loss"]) and math.isfinite(facts["best"])
    r = lmforge("info", "baby", "--json", cwd=tmp_path)
    assert "checkpoint" not in json.loads(r.stdout)  # a preset has no training facts


def test_export_of_a_char_model_loads_in_autotokenizer(trained, tmp_path):
    tf = pytest.importorskip("transformers")
    root, last, r = trained
    assert r.returncode == 0, r.stderr[-3000:]
    r = lmforge("export", "--model", root / "run", "--out", "hf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from lmforge.tokenizer import load_tokenizer

    ours = load_tokenizer(last / "tokenizer.json")
    hf = tf.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Once upon a time, the cat sat."
    assert hf(text)["input_ids"] == ours.encode(text)


def test_export_to_an_existing_file_is_one_line(trained, tmp_path):
    _, last, r = trained
    assert r.returncode == 0, r.stderr[-3000:]
    (tmp_path / "taken").write_text("keep me")
    assert_one_line_error(lmforge("export", "--model", last, "--out", "taken", cwd=tmp_path), "taken", "is a file")
    assert (tmp_path / "taken").read_text() == "keep me"


def test_tokenizer_train_bad_inputs_are_one_line(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("na\u00efve caf\u00e9\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ok.txt").write_text("hello world\n" * 20)
    (tmp_path / "afile").write_text("x")
    for kind in ("bpe", "char"):
        r = lmforge("tokenizer", "train", "--kind", kind, "--input", "latin1.txt", "--out", "t.json", cwd=tmp_path)
        assert_one_line_error(r, "latin1.txt: not UTF-8 text")
        r = lmforge("tokenizer", "train", "--kind", kind, "--input", "empty.txt", "--out", "t.json", cwd=tmp_path)
        assert_one_line_error(r, "empty.txt: empty")
    r = lmforge("tokenizer", "train", "--kind", "char", "--input", "ok.txt", "--out", "afile/t.json", cwd=tmp_path)
    assert_one_line_error(r, "afile is a file")
    r = lmforge("tokenizer", "train", "--kind", "char", "--input", "ok.txt", "--out", ".", cwd=tmp_path)
    assert_one_line_error(r, "is a folder")
    assert not (tmp_path / "t.json").exists()


def test_tokenizer_encode_of_invalid_utf8_is_one_line(tmp_path):
    (tmp_path / "ok.txt").write_text("hello world, the cat sat on the mat\n" * 20)
    r = lmforge("tokenizer", "train", "--input", "ok.txt", "--vocab-size", "300", "--out", "bpe.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LC_ALL": "C.UTF-8"}
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "tokenizer", "encode", "--tokenizer", "bpe.json",
                        "--text", b"caf\xe9"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert_one_line_error(r, "not valid unicode", "lone surrogate")
