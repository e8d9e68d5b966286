"""Unit tests for faqtune.config (load, coerce, save), faqtune.validation and cli.parse_overrides."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from faqtune.cli import parse_overrides
from faqtune.config import FaqtuneConfig, field_help, load_config
from faqtune.errors import ConfigError
from faqtune.run import RunDir
from faqtune.validation import normalise, validate


def _problems(**kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    assert str(len(info.value.problems)) in str(info.value)
    return info.value.problems


def _one_problem(**kwargs) -> str:
    problems = _problems(**kwargs)
    assert len(problems) == 1, problems
    return problems[0]


def test_defaults_validate():
    cfg = FaqtuneConfig()
    validate(cfg)
    assert load_config() == cfg
    assert (cfg.lora.r, cfg.lora.target_modules, cfg.quantization.mode) == (64, "all-linear", "4bit")


def test_validate_checks_without_changing_the_config():
    """`validate` only checks: a spelling `normalise` would fix is reported, and the config stays as it was."""
    cfg = FaqtuneConfig()
    cfg.quantization.mode, cfg.generation.merged = "NONE", "BF16"
    before = copy.deepcopy(cfg)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert cfg == before
    assert [p.split("`")[1] for p in info.value.problems] == ["quantization.mode", "generation.merged"]
    normalise(cfg)
    validate(cfg)
    assert (cfg.quantization.mode, cfg.generation.merged) == ("none", "bf16")


CHOICES_AS_TYPED = {"data.format": ("JSONL", "jsonl"), "quantization.mode": ("NONE", "none"),
                    "quantization.quant_type": ("FP4", "fp4"), "quantization.compute_dtype": ("FP32", "fp32"),
                    "quantization.adapter_dtype": ("Bf16", "bf16"), "lora.bias": ("Lora_Only", "lora_only"),
                    "train.gradient_checkpointing": ("True", "true"), "grounding.mode": ("None", "none"),
                    "generation.merged": ("AUTO", "auto")}


def test_choices_are_normalised_once_at_load(tmp_path):
    cfg = load_config(overrides={key: typed for key, (typed, _) in CHOICES_AS_TYPED.items()})
    loaded = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in CHOICES_AS_TYPED}
    assert loaded == {key: spelled for key, (_, spelled) in CHOICES_AS_TYPED.items()}
    path = tmp_path / "c.yaml"
    path.write_text("quantization:\n  quant_type: NF4\n  compute_dtype: BF16\n", encoding="utf-8")
    q = load_config(path).quantization
    assert (q.quant_type, q.compute_dtype) == ("nf4", "bf16")


def test_normalise_leaves_an_invalid_choice_as_written():
    cfg = FaqtuneConfig()
    cfg.quantization.mode = "3BIT"
    normalise(cfg)
    assert cfg.quantization.mode == "3BIT"
    assert "got '3BIT'" in _one_problem(overrides={"quantization.mode": "3BIT"})


@pytest.mark.parametrize("value", ["-1", "BOGUS", "0"])
def test_each_bad_value_is_reported_once(value):
    """One bad setting, one problem: no check runs twice (a key named twice would be a check run twice)."""
    for key in field_help():
        try:
            load_config(overrides={key: value})
        except ConfigError as e:
            assert len(e.problems) == 1 and f"`{key}`" in e.problems[0], (key, e.problems)


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "# faqtune train --config run.yaml\n"
        "base_model: some/model\n"
        "lora:\n  r: 8\n  target_modules: [q_proj, v_proj]\n"
        "train:\n  epochs: 2\n  learning_rate: 2e-4\n",  # YAML 1.1 reads 2e-4 as a string
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert cfg.base_model == "some/model"
    assert cfg.lora.r == 8 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.train.learning_rate == pytest.approx(2e-4) and isinstance(cfg.train.learning_rate, float)
    assert cfg.lora.alpha == 16  # untouched default
    cfg = load_config(path, overrides={"lora.r": "4"})
    assert cfg.lora.r == 4 and cfg.train.epochs == 2.0  # the override wins, the rest of the file stays


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n", encoding="utf-8")
    assert load_config(path) == FaqtuneConfig()


def test_string_overrides_are_coerced():
    cfg = load_config(overrides={"train.epochs": "3", "lora.r": "8", "generation.top_p": "0.9",
                                 "train.max_steps": "1e2", "data.eval_fraction": "0"})
    assert cfg.train.epochs == 3.0 and type(cfg.train.epochs) is float
    assert cfg.lora.r == 8 and type(cfg.lora.r) is int
    assert cfg.generation.top_p == 0.9
    assert cfg.train.max_steps == 100 and type(cfg.train.max_steps) is int
    assert cfg.data.eval_fraction == 0.0


@pytest.mark.parametrize("key,value,fragment", [
    ("lora.r", "8.5", "`lora.r` must be an integer, got '8.5'"),
    ("lora.r", "eight", "`lora.r` must be an integer"),
    ("train.learning_rate", "fast", "`train.learning_rate` must be a number"),
    ("train.packing", "maybe", "`train.packing` must be true or false, got 'maybe'"),
    ("lora.r", True, "`lora.r` must be an integer"),
    ("grounding.question_weight", "1.5", "`grounding.question_weight` must be in [0, 1], got 1.5"),
    ("grounding.joint_weight", "-0.2", "`grounding.joint_weight` must be in [0, 1], got -0.2"),
    ("grounding.related", "-1", "`grounding.related` must be in [0, 10], got -1"),
    ("train.batch_size", str(10**100), "`train.batch_size` must be in [1, 65536], got 1000"),
    ("train.gradient_accumulation_steps", "0", "`train.gradient_accumulation_steps` must be in [1, 65536], got 0"),
])
def test_uncoercible_values(key, value, fragment):
    assert fragment in _one_problem(overrides={key: value})


@pytest.mark.parametrize("value,expected", [
    ("all-linear", "all-linear"), ("q_proj,v_proj", ["q_proj", "v_proj"]),
    (" q_proj , v_proj ,", ["q_proj", "v_proj"]), (["q_proj", "k_proj"], ["q_proj", "k_proj"]),
])
def test_target_modules(value, expected):
    assert load_config(overrides={"lora.target_modules": value}).lora.target_modules == expected


def test_target_modules_yaml_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  target_modules:\n    - q_proj\n    - o_proj\n", encoding="utf-8")
    assert load_config(path).lora.target_modules == ["q_proj", "o_proj"]


def test_target_modules_single_name():
    assert load_config(overrides={"lora.target_modules": "q_proj"}).lora.target_modules == ["q_proj"]


BOOLS = [("true", True), ("False", False), ("yes", True), ("off", False), ("1", True), ("0", False),
         (True, True)]


@pytest.mark.parametrize("value,expected", BOOLS)
def test_booleans_from_strings(value, expected):
    keys = ("train.packing", "trust_remote_code", "quantization.double_quant")
    cfg = load_config(overrides=dict.fromkeys(keys, value))
    assert cfg.train.packing is cfg.trust_remote_code is cfg.quantization.double_quant is expected


@pytest.mark.parametrize("yaml_value,expected", [("true", "true"), ("false", "false"), ("auto", "auto")])
def test_yaml_boolean_for_gradient_checkpointing(tmp_path, yaml_value, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  gradient_checkpointing: {yaml_value}\n", encoding="utf-8")
    assert load_config(path).train.gradient_checkpointing == expected


def test_null_for_optional_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: faq.csv\n  system_prompt: ~\n  question_field: null\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.data.path == "faq.csv" and cfg.data.system_prompt is None and cfg.data.question_field is None
    assert load_config(path, overrides={"data.path": "null"}).data.path is None
    assert load_config(path, overrides={"data.path": "None"}).data.path is None


def test_null_for_required_string_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base_model:\noutput_dir:\n", encoding="utf-8")
    problems = _problems(path=path)
    assert any("base_model" in p for p in problems) and any("output_dir" in p for p in problems)


def test_all_invalid_values_reported_together():
    problems = _problems(overrides={"lora.r": "0", "train.learning_rate": "-1", "quantization.mode": "3bit"})
    assert len(problems) == 3, problems
    keys = ("lora.r", "train.learning_rate", "quantization.mode")
    by_key = {k: [p for p in problems if f"`{k}`" in p] for k in keys}
    assert all(len(v) == 1 for v in by_key.values()), by_key
    assert "got 0" in by_key["lora.r"][0]
    assert "got -1.0" in by_key["train.learning_rate"][0]
    assert "'3bit'" in by_key["quantization.mode"][0] and "4bit" in by_key["quantization.mode"][0]


def test_type_and_range_problems_reported_together():
    problems = _problems(overrides={"lora.r": "abc", "train.learning_rate": "-1"})
    assert len(problems) == 2, problems


@pytest.mark.parametrize("key,value", [
    ("data.eval_fraction", "1"), ("data.max_seq_length", "8"), ("lora.dropout", "1.5"),
    ("lora.target_modules", []), ("train.epochs", "0"), ("generation.top_p", "0"),
    ("generation.num_return_sequences", "3"), ("quantization.quant_type", "int4"),
])
def test_single_invalid_value(key, value):
    assert f"`{key}`" in _one_problem(overrides={key: value})


def test_sampling_needed_for_several_answers():
    problem = _one_problem(overrides={"generation.num_return_sequences": "3", "generation.temperature": "0"})
    assert "generation.temperature" in problem
    cfg = load_config(overrides={"generation.num_return_sequences": "3", "generation.temperature": "0.7"})
    assert cfg.generation.num_return_sequences == 3


def test_epochs_zero_allowed_with_max_steps():
    assert load_config(overrides={"train.epochs": "0", "train.max_steps": "10"}).train.max_steps == 10


@pytest.mark.parametrize("key,suggestion", [
    ("train.epoch", "train.epochs"), ("train.learning_rat", "train.learning_rate"),
    ("qantization.mode", "quantization"),
])
def test_unknown_key_suggests(key, suggestion):
    problem = _one_problem(overrides={key: "1"})
    assert "unknown key" in problem and f"did you mean `{suggestion}`" in problem


def test_unknown_key_lora_rank_suggests_r():
    assert "did you mean `lora.r`" in _one_problem(overrides={"lora.rank": "8"})


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\nlora: 8\n", encoding="utf-8")
    problems = _problems(path=path)
    assert len(problems) == 2 and all(p.startswith(str(path)) for p in problems)
    assert "did you mean `train.epochs`" in problems[0]
    assert "`lora` must be a mapping" in problems[1]


def test_range_problems_name_where_the_value_was_set(tmp_path):
    """A value out of range names its file (or `override`); one that only breaks a rule with another value names
    the source of each; a default names none."""
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: -1\ntrain:\n  keep_best: true\n  eval_steps: 3\n", encoding="utf-8")
    problems = _problems(path=path, overrides={"generation.top_p": "2", "train.save_steps": "10"})
    by_key = {k: next(p for p in problems if f"`{k}`" in p) for k in ("lora.r", "generation.top_p", "train.keep_best")}
    assert by_key["lora.r"].startswith(f"{path}: `lora.r` must be > 0")
    assert by_key["generation.top_p"].startswith("override: `generation.top_p`")
    assert by_key["train.keep_best"].startswith(f"{path}, override: `train.keep_best` needs")
    cfg = FaqtuneConfig()
    cfg.lora.r = 0
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.problems == ["`lora.r` must be > 0, got 0"]


def test_scheduler_and_optimizer_names_are_checked_at_load(tmp_path):
    """A misspelt name failed only after the model had loaded, inside transformers, naming no key."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr_scheduler: linearr\n  optimizer: adamw_torc\n", encoding="utf-8")
    problems = _problems(path=path)
    assert problems[0].startswith(f"{path}: `train.lr_scheduler` must be one of transformers' ")
    assert "(closest: linear" in problems[0] and problems[0].endswith("got 'linearr'")
    assert problems[1].startswith(f"{path}: `train.optimizer`") and "closest: adamw_torch" in problems[1]
    cfg = load_config(overrides={"train.lr_scheduler": "linear", "train.optimizer": "adamw_torch"})
    assert (cfg.train.lr_scheduler, cfg.train.optimizer) == ("linear", "adamw_torch")


@pytest.mark.parametrize("key,name,why", [("train.lr_scheduler", "cosine_with_min_lr", "min_lr"),
                                          ("train.optimizer", "galore_adamw", "galore")])
def test_a_known_name_that_cannot_run_here_is_refused_at_load(key, name, why):
    """transformers knows these names, but the first training step failed after the base had loaded (a scheduler
    needing an argument faqtune does not pass, an optimizer whose package is not installed)."""
    with pytest.raises(ConfigError) as e:
        load_config(overrides={key: name})
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(f"override: `{key}` must be one that can run here (")
    assert why in e.value.problems[0].lower()


@pytest.mark.parametrize("key", ["base_model", "output_dir", "grounding.embedder"])
def test_a_blank_model_or_folder_is_refused(key):
    """`--base "  "` was looked up on the Hub; an empty embedder name fell back to the default silently."""
    assert _one_problem(overrides={key: "  "}) == f"override: `{key}` must be set (a name or a path), got '  '"


@pytest.mark.parametrize("spec", ["general:-1", "general:1.5", "general:0", "general:nan"])
def test_a_mix_share_out_of_range_is_named_as_such(spec):
    """A negative share was read as part of a file name: 'general:-1: no such file'."""
    assert "`data.mix` entries must be FILE[:SHARE] with 0 < SHARE < 1" in _one_problem(overrides={"data.mix": spec})


def test_a_key_set_twice_in_the_yaml_is_refused(tmp_path):
    """PyYAML keeps the last of two values silently: a user editing the first saw no effect."""
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 8\n  alpha: 16\n  r: 16\n", encoding="utf-8")
    assert _one_problem(path=path) == f"{path} line 4: invalid YAML (`r` is set twice)"
    path.write_text("lora: &l\n  r: 8\ntrain:\n  epochs: 2\n", encoding="utf-8")  # anchors still load
    assert load_config(path).lora.r == 8


def test_override_takes_over_the_source_of_a_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 8\n", encoding="utf-8")
    assert _one_problem(path=path, overrides={"lora.r": "0"}).startswith("override: `lora.r`")


def test_a_runs_bad_setting_names_its_config_file(tmp_path):
    (tmp_path / "config.yaml").write_text("grounding:\n  top_k: 99\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        RunDir(tmp_path).load_config()
    assert e.value.problems == [f"{tmp_path / 'config.yaml'}: `grounding.top_k` must be in [1, 20], got 99"]


@pytest.mark.parametrize("text,fragments", [
    ("train:\n  epochs: [1, 2\nlora: {}\n", ["invalid YAML", "line"]),
    ("- a\n- b\n", ["must be a mapping", "list"]),
    ("just text\n", ["must be a mapping", "str"]),
])
def test_bad_yaml_file(tmp_path, text, fragments):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    problem = _one_problem(path=path)
    assert problem.startswith(str(path))
    assert all(f in problem for f in fragments), problem


def test_missing_and_non_utf8_config_file(tmp_path):
    assert _one_problem(path=tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: no such config file"
    bad = tmp_path / "latin.yaml"
    bad.write_bytes("base_model: caf\xe9\n".encode("latin-1"))
    assert _one_problem(path=bad) == f"{bad}: not UTF-8 text"


def test_config_path_is_directory(tmp_path):
    assert str(tmp_path) in _one_problem(path=tmp_path)


def test_large_integer_keeps_precision():
    assert load_config(overrides={"train.seed": str(2**53 + 1)}).train.seed == 2**53 + 1


def test_save_load_round_trip(tmp_path):
    cfg = load_config(overrides={
        "base_model": "org/model-1b", "trust_remote_code": "true", "data.path": "faq: v2.csv",
        "data.system_prompt": "You answer FAQs.\nBe brief: one sentence.",
        "lora.target_modules": "q_proj,v_proj",
        "quantization.mode": "none", "train.epochs": "2.5", "train.learning_rate": "3e-5",
        "generation.temperature": "0.7", "generation.num_return_sequences": "2",
    })
    assert cfg != FaqtuneConfig()
    path = tmp_path / "saved.yaml"
    cfg.save(path)
    assert load_config(path) == cfg
    FaqtuneConfig().save(path)
    assert load_config(path) == FaqtuneConfig()


def _leaf_fields(cls, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            out += _leaf_fields(sub, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_field_help_covers_every_field():
    helps = field_help()
    assert sorted(helps) == sorted(_leaf_fields(FaqtuneConfig))
    assert {"lora.r", "train.epochs", "data.max_seq_length", "base_model"} <= set(helps)
    assert all(isinstance(text, str) and text.strip() for _, text in helps.values())
    assert helps["lora.r"][0] == 64 and helps["train.optimizer"][0] == "paged_adamw_8bit"


# --- cli.parse_overrides -------------------------------------------------------------------------


@pytest.mark.parametrize("argv,expected", [
    (["--train.epochs", "3"], {"train.epochs": "3"}),
    (["--lora.r=8"], {"lora.r": "8"}),
    (["--epochs", "2"], {"train.epochs": "2"}),
    (["--learning-rate", "1e-3"], {"train.learning_rate": "1e-3"}),
    (["--train.max_steps", "-1"], {"train.max_steps": "-1"}),
    (["--data.system_prompt=a=b"], {"data.system_prompt": "a=b"}),
    (["--base_model", "m", "--lora.r", "8", "--target-modules=q_proj,v_proj"],
     {"base_model": "m", "lora.r": "8", "lora.target_modules": "q_proj,v_proj"}),
    ([], {}),
])
def test_parse_overrides(argv, expected):
    assert parse_overrides(argv) == expected


def test_parse_overrides_feed_load_config():
    cfg = load_config(overrides=parse_overrides(["--epochs", "3", "--lora.r=8", "--packing", "yes"]))
    assert (cfg.train.epochs, cfg.lora.r, cfg.train.packing) == (3.0, 8, True)


@pytest.mark.parametrize("argv,fragment", [
    (["--epoks", "3"], "unknown setting --epoks (did you mean --epochs?)"),
    (["--lora.rank", "8"], "did you mean --lora.r?"),
    (["--train.epochs"], "--train.epochs needs a value"),
    (["--train.epochs", "--lora.r", "8"], "--train.epochs needs a value"),
    (["3"], "unexpected argument '3'"),
])
def test_parse_overrides_errors(argv, fragment):
    with pytest.raises(ConfigError) as info:
        parse_overrides(argv)
    assert len(info.value.problems) == 1 and fragment in info.value.problems[0], info.value.problems


def test_parse_overrides_reports_all_problems():
    with pytest.raises(ConfigError) as info:
        parse_overrides(["--epoks", "3", "--lora.r", "8", "--rr", "1", "--top_p"])
    assert len(info.value.problems) == 3


def test_parse_overrides_ambiguous_leaf():
    with pytest.raises(ConfigError) as info:
        parse_overrides(["--seed", "1"])
    problem = info.value.problems[0]
    assert "data.seed" in problem and "train.seed" in problem


def test_a_run_saved_before_joint_vectors_keeps_its_index_scoring(tmp_path):
    """Its config.yaml has no grounding.joint_weight: a rebuild (`faqtune index`, `train --resume`) must score
    as the run was trained, not with the new default."""
    import yaml

    from faqtune.run import load_saved_settings

    path = tmp_path / "config.yaml"
    FaqtuneConfig().save(path)
    assert load_saved_settings(path).grounding.joint_weight == 0.6
    saved = yaml.safe_load(path.read_text())
    del saved["grounding"]["joint_weight"]
    path.write_text(yaml.safe_dump(saved))
    assert load_saved_settings(path).grounding.joint_weight == 0.0
    assert load_saved_settings(path, {"grounding.joint_weight": 0.3}).grounding.joint_weight == 0.3


def test_a_run_saved_before_embedder_tuning_was_the_default_keeps_the_shipped_embedder(tmp_path):
    """Runs saved before session 9 have no grounding.embedder_epochs: their index was built with the embedder as
    shipped, and a rebuild must not start tuning it (the default is now 1)."""
    import yaml

    from faqtune.run import load_saved_settings

    path = tmp_path / "config.yaml"
    FaqtuneConfig().save(path)
    assert load_saved_settings(path).grounding.embedder_epochs == 1
    saved = yaml.safe_load(path.read_text())
    del saved["grounding"]["embedder_epochs"]
    path.write_text(yaml.safe_dump(saved))
    assert load_saved_settings(path).grounding.embedder_epochs == 0
    assert load_saved_settings(path, {"grounding.embedder_epochs": 2}).grounding.embedder_epochs == 2


@pytest.mark.parametrize("line,key,got", [("grounding:\n  decline_message: No\n", "grounding.decline_message", "False"),
                                          ("data:\n  question_field: 0755\n", "data.question_field", "493"),
                                          ("base_model: 1.50\n", "base_model", "1.5")])
def test_text_settings_that_yaml_read_as_booleans_or_numbers_are_refused(tmp_path, line, key, got):
    """They were turned back into text silently, changed: No -> 'false', 0755 -> '493', 1.50 -> '1.5'."""
    path = tmp_path / "c.yaml"
    path.write_text(line + "train:\n  gradient_checkpointing: false\n", encoding="utf-8")  # a choice: still read
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.problems == [f"{path}: `{key}` must be text, got {got}: YAML reads an unquoted yes/no/on/off or "
                                "number as such (yes is true, 0755 is 493, 1.50 is 1.5); quote it"]
