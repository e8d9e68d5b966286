"""The config loader never crashes: random YAML text, random settings trees, random overrides and CLI tokens
raise only ConfigError; unknown keys get a "did you mean"; every invalid value is reported at once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faqtune.cli import parse_overrides
from faqtune.config import FaqtuneConfig, field_help, load_config
from faqtune.errors import ConfigError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DOTTED = sorted(field_help())
SECTIONS = sorted({k.split(".")[0] for k in DOTTED})
LEAVES = sorted({k.rsplit(".", 1)[-1] for k in DOTTED})

SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**20) | st.floats()
           | st.text(max_size=15) | st.sampled_from(["auto", "true", "4bit", "all-linear", "1e400", "²", "nan",
                                                      "general:0.5", "q_proj,v_proj", "-1", "0"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                           max_size=3), max_leaves=8)
TREES = st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=8),
                        VALUES | st.dictionaries(st.sampled_from(LEAVES) | st.text(max_size=8), VALUES, max_size=5),
                        max_size=6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("config-fuzz")


def check(path: Path | None = None, overrides: dict | None = None):
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
        assert str(e).startswith(f"invalid configuration ({len(e.problems)} problem(s)):")
        return e
    assert isinstance(cfg, FaqtuneConfig)
    return cfg


@FUZZ
@given(text=st.text(max_size=300) | st.binary(max_size=300))
def test_random_yaml_text(folder, text):
    path = folder / "config.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check(path)


@FUZZ
@given(tree=TREES)
def test_random_settings_trees(folder, tree):
    path = folder / "tree.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=False), encoding="utf-8")
    check(path)


@FUZZ
@given(overrides=st.dictionaries(st.sampled_from(DOTTED) | st.text(max_size=12), VALUES, max_size=6))
def test_random_overrides(overrides):
    check(None, overrides)


@FUZZ
@given(tokens=st.lists(st.sampled_from([f"--{k}" for k in DOTTED] + ["--epochs", "--lr", "--r=8", "--", "-x", "x"])
                       | st.text(max_size=10), max_size=6))
def test_random_cli_setting_tokens(tokens):
    try:
        overrides = parse_overrides(tokens)
    except ConfigError:
        return
    check(None, overrides)


@pytest.mark.parametrize("yaml_text,expected", [
    ("[" * 10_000, "nested too deeply"),
    ("train:\n  epochs: " + "9" * 5000 + "\n", "4300 digits"),
    ("train:\n  learning_rate: " + "9" * 400 + "\n", "`train.learning_rate` must be a number"),
    ("train:\n  epochs: .inf\n", "`train.epochs` must be a finite number"),
    ("train:\n  max_steps: '²'\n", "`train.max_steps` must be an integer, got '²'"),
    ("!!python/object/apply:os.system ['true']\n", "invalid YAML"),
])
def test_known_crashers_are_config_errors(folder, yaml_text, expected):
    path = folder / "crasher.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    error = check(path)
    assert isinstance(error, ConfigError) and expected in str(error)


def test_a_yaml_alias_bomb_is_refused_quickly(folder):
    """Nine levels of nine aliases: 387 million strings if expanded; the messages must not print them."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    lines += ["train: *a8", "lora:", "  target_modules: *a8", "data:", "  mix: *a8"]
    path = folder / "bomb.yaml"
    path.write_text("\n".join(lines), encoding="utf-8")
    started = time.monotonic()
    error = check(path)
    assert isinstance(error, ConfigError) and time.monotonic() - started < 5
    assert len(str(error)) < 5000


@pytest.mark.parametrize("source,expected", [
    ({"lora": {"rank": 8}}, "unknown key `lora.rank` (did you mean `lora.r`?)"),
    ({"train": {"learning_rte": 0.1}}, "unknown key `train.learning_rte` (did you mean `train.learning_rate`?)"),
    ({"trian": {"epochs": 1}}, "unknown key `trian` (did you mean `train`?)"),
    ({"base": "x"}, "unknown key `base` (did you mean `base_model`?)"),
])
def test_unknown_keys_get_a_suggestion(folder, source, expected):
    path = folder / "typo.yaml"
    path.write_text(yaml.safe_dump(source), encoding="utf-8")
    assert expected in str(check(path))


def test_unknown_cli_setting_gets_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean --train.learning_rate"):
        parse_overrides(["--train.learning_rte", "0.1"])


def test_every_invalid_value_is_reported_at_once(folder):
    path = folder / "many.yaml"
    path.write_text("lora:\n  r: 0\n  dropout: 2\ntrain:\n  learning_rate: -1\n  batch_size: zero\n"
                    "  gradient_checkpointing: sometimes\nquantization:\n  mode: 3bit\nbogus: 1\n", encoding="utf-8")
    error = check(path, {"generation.top_p": "7"})
    assert isinstance(error, ConfigError) and len(error.problems) == 8
    for key in ("lora.r", "lora.dropout", "train.learning_rate", "train.batch_size", "train.gradient_checkpointing",
                "quantization.mode", "bogus", "generation.top_p"):
        assert any(f"`{key}`" in p for p in error.problems), key
