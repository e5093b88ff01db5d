"""Config files: round trip, overrides, and one clear error for every bad value."""

import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, TINY_CONFIG
from transformer.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    from_dict,
    load_config,
    save_config,
    to_dict,
)


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


def test_shipped_configs_load():
    for name in ("default", "multi30k", "tiny"):
        cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"), [] if name != "multi30k"
                          else ["data.path=" + os.path.join(ROOT, "tests", "toy_corpus")])
        assert cfg.name == name
        # Every value the file sets is the value the run gets (none dropped or defaulted).
        with open(os.path.join(ROOT, "configs", f"{name}.yaml")) as f:
            written = yaml.safe_load(f)
        loaded = to_dict(cfg)
        for section, values in written.items():
            for key, value in values.items():
                if not (name == "multi30k" and key == "path"):
                    got = loaded[section][key]
                    assert got == (list(value) if isinstance(value, tuple) else value), key


def test_shipped_sweep_files_load():
    from transformer.sweep import load_sweep

    sweeps = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                    if "base:" in open(os.path.join(ROOT, "configs", f)).read())
    assert {"sweep.yaml", "multi30k-seeds.yaml", "multi30k-norm.yaml",
            "multi30k-batch.yaml", "multi30k-dropout.yaml",
            "multi30k-vocab.yaml"} <= set(sweeps)
    for name in sweeps:  # every run of every point is checked as its config is built
        sweep = load_sweep(os.path.join(ROOT, "configs", name),
                           ["data.path=" + os.path.join(ROOT, "tests", "toy_corpus")])
        assert sweep.runs(), name


def test_round_trip(tmp_path):
    cfg = load_config(TINY_CONFIG, ["model.n_heads=4", "train.lr=0.01"])
    path = str(tmp_path / "config.yaml")
    save_config(cfg, path)
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert again.model.n_heads == 4 and again.train.lr == 0.01


def test_overrides_are_typed():
    cfg = load_config(TINY_CONFIG, ["model.d_model=64", "model.share_embeddings=false",
                                    "train.max_minutes=2", "data.src_lang=de"])
    assert cfg.model.d_model == 64 and cfg.model.share_embeddings is False
    assert cfg.train.max_minutes == 2.0 and isinstance(cfg.train.max_minutes, float)
    with pytest.raises(ConfigError, match="model.n_heads: expected int, got 'four'"):
        load_config(TINY_CONFIG, ["model.n_heads=four"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(TINY_CONFIG, ["n_heads=4"])


@pytest.mark.parametrize("text, message", [
    ("model:\n  d_modle: 128\n", r"model.d_modle: unknown key"),
    ("modle:\n  d_model: 128\n", r"modle: unknown section"),
    ("model:\n  d_model: 100\n  n_heads: 8\n",
     r"model.d_model: expected a multiple of model.n_heads"),
    ("model:\n  dropout: 1.0\n", r"model.dropout: expected a value in \[0, 1\)"),
    ("model:\n  dropout: -0.1\n", r"model.dropout: expected a value in \[0, 1\)"),
    ("model:\n  n_layers: 2.5\n", r"model.n_layers: expected int"),
    ("model:\n  norm: middle\n", r"model.norm: expected one of post, pre"),
    ("train:\n  batch_tokens: 0\n", r"train.batch_tokens: expected a positive integer"),
    ("data:\n  corpus: multi30k\n  path: /no/such/folder\n", r"data.path: .* does not exist"),
    ("data:\n  corpus: files\n", r"data.path: expected the folder"),
    ("data:\n  joint_vocab: false\nmodel:\n  share_embeddings: true\n", r"needs data.joint_vocab"),
    ("model: [1, 2\n", r"not valid YAML"),
    ("model:\n  d_model: 64\nmodel:\n  n_heads: 2\n",
     r"\(line 3\): the key 'model' is given twice"),
    ("model:\n  d_model: 64\n  d_model: 32\n", r"\(line 3\): the key 'd_model' is given twice"),
    ("train:\n  lr: .inf\n", r"train.lr: expected a finite number, got inf"),
    ("decode:\n  max_len_a: .inf\n", r"decode.max_len_a: expected a finite number"),
    ("train:\n  lr: .nan\n", r"train.lr: expected a finite number, got nan"),
    ("train:\n  lr: fast\n", r"train.lr: expected float, got 'fast'"),
    ("train:\n  betas: 0.999\n", r"train.betas: expected a list of numbers, got 0.999"),
    ("train:\n  betas: [0.9, x]\n", r"train.betas: expected float, got 'x'"),
    ("train:\n  betas: [0.9, .inf]\n", r"train.betas: expected a finite number, got inf"),
    ("train:\n  betas: [0.9]\n", r"train.betas: expected two numbers in \[0, 1\)"),
    ("train:\n  schedule: cosine\n", r"train.max_steps: expected more than train.warmup_steps "
     r"for the cosine schedule"),
    ("train:\n  schedule: linear\n", r"train.schedule: expected one of inverse_sqrt, cosine"),
    ("- just\n- a list\n", r"expected a mapping"),
])
def test_bad_values_raise_one_error_naming_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(e.value).startswith(path) and "\n" not in str(e.value)


def test_learning_rates_written_as_people_write_them():
    # YAML 1.1 reads 3e-3 (no dot) as text; a config or an override means the number.
    assert load_config(TINY_CONFIG, ["train.lr=5e-4"]).train.lr == 0.0005
    assert load_config(TINY_CONFIG, ["train.lr=1E-3", "decode.max_len_a=1e0"]).train.lr == 0.001


def test_learning_rate_in_a_file_as_3e_3(tmp_path):
    assert load_config(_write(tmp_path, "train:\n  lr: 3e-3\n")).train.lr == 0.003


def test_infinity_on_the_command_line_is_refused():
    with pytest.raises(ConfigError, match="train.lr: expected a finite number"):
        load_config(TINY_CONFIG, ["train.lr=.inf"])


def test_a_config_built_in_code_is_checked_as_a_file_is():
    with pytest.raises(ConfigError, match=r"^model.d_model: expected a multiple of model.n_heads"):
        ModelConfig(d_model=10, n_heads=3)
    with pytest.raises(ConfigError, match=r"^model.norm: expected one of post, pre, got 'mid'"):
        ModelConfig(norm="mid")
    with pytest.raises(ConfigError, match=r"^model.share_embeddings: true needs data.joint"):
        Config(model=ModelConfig(share_embeddings=True), data=DataConfig(joint_vocab=False))
    assert ModelConfig(d_model=12, n_heads=3).d_model == 12  # a good one is made


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/no/such/config.yaml")


def test_yaml_tags_that_build_objects_are_rejected(tmp_path):
    path = _write(tmp_path, "model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_from_dict_rejects_non_mapping_section():
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        from_dict({"model": 3})


def test_cli_prints_one_line_and_exits_2_on_bad_config(tmp_path):
    path = _write(tmp_path, "model:\n  d_modle: 128\n")
    script = os.path.join(ROOT, "scripts", "train.py")
    result = subprocess.run([sys.executable, script, "--config", path],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: model.d_modle: unknown key; expected one of d_model, n_heads, n_layers, "
        "d_ff, dropout, attn_dropout, ff_dropout, positions, norm, attention, share_embeddings, "
        "max_positions"
    ]
