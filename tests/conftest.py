"""Shared fixtures: a tiny random Llama with a tiny tokenizer, built once per session (seconds on CPU)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    """Keep the model cache of the tests away from the user's (the embedded default is reused if present)."""
    os.environ.setdefault("FAQTUNE_HOME", str(Path.home() / ".cache" / "faqtune"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _build_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from faqtune.data import bundled_faq_path

    texts = [e["question"] + " " + e["answer"] for e in json.loads(bundled_faq_path().read_text())["questions"]]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts * 2, trainer)
    eos = "<|im_end|>" if chat_template else "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, chat_template=chat_template)


def build_tiny_llama(folder: Path, chat_template: str | None = CHATML) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer(chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama with a ChatML template (EOS = <|im_end|>)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_base_no_template(tmp_path_factory) -> Path:
    """The same tiny Llama whose tokenizer has no chat template (the guide's format applies)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-plain"), chat_template=None)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def thing_rows(n: int = 10, answer: str = "Thing {i} is done on page {i}.") -> list[dict[str, str]]:
    """The "thing number i" FAQ the tests train and ask on, written here once (an answer a test can recognise)."""
    return [{"question": f"How do I do thing number {i}?", "answer": answer.format(i=i)} for i in range(n)]


def one_error_line(capsys) -> str:
    """The one `error: ...` line a command printed on stderr, with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def assert_shared_as_umask(folder: Path, weights: str) -> None:
    """The weights file and its folder have the modes the umask gives any file and folder (its JSON files')."""
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.suffix in (".json", ".safetensors")}
    assert modes[weights] == 0o666 & ~umask and set(modes.values()) == {0o666 & ~umask}, modes
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def write_faq(path: Path, rows: list[dict[str, str]]) -> Path:
    """`rows` as an FAQ file in the guide's JSON shape."""
    path.write_text(json.dumps({"questions": rows}), encoding="utf-8")
    return path


@pytest.fixture
def small_faq(tmp_path) -> Path:
    """Ten Q/A pairs in the guide's JSON shape."""
    return write_faq(tmp_path / "faq.json", thing_rows(answer="Thing {i} is done in the settings page, step {i}."))


@pytest.fixture(scope="session")
def tiny_runs(tiny_base, tmp_path_factory):
    """The session's tiny trained runs: `tiny_runs(*flags, faq=None, name="run")` is `faqtune train` of the tiny
    Llama (on `faq`: the ten "thing number i" entries by default, "" for the bundled FAQ) with these flags,
    trained once per session for each distinct request. A test that changes a run copies it first."""
    from faqtune.cli import main

    made: dict[tuple, Path] = {}
    default_faq = write_faq(tmp_path_factory.mktemp("thing-faq") / "faq.json", thing_rows())

    def make(*flags: str, faq: Path | str | None = None, name: str = "run") -> Path:
        data = str(default_faq if faq is None else faq)
        key = (data, flags, name)
        if key not in made:
            run = tmp_path_factory.mktemp("tiny-run") / name
            argv = ["train", "--base", str(tiny_base), *(["--data", data] if data else []), "--output", str(run)]
            assert main([*argv, *flags]) == 0, f"training the tiny run {name} {flags} failed"
            made[key] = run
        return made[key]

    return make


@pytest.fixture(scope="session")
def bundled():
    """The bundled e-commerce FAQ's entries."""
    from faqtune import data as data_mod

    return data_mod.load_faq(data_mod.bundled_faq_path()).entries


@pytest.fixture(scope="session")
def index(bundled, tmp_path_factory):
    """The bundled FAQ indexed with the defaults (embedded embedder, calibrated threshold), built once."""
    from faqtune.config import load_config
    from faqtune.grounding import build_index

    return build_index(tmp_path_factory.mktemp("index"), bundled, load_config(None))


# Fixtures that load a model: the tiny Llama, its tokenizer, and the index (the embedded MiniLM embedder, through
# sentence-transformers and torch).
MODEL_FIXTURES = {"tiny_base", "tiny_base_no_template", "tiny_tokenizer", "index", "tiny_runs"}


def pytest_collection_modifyitems(config, items):
    """Mark the tiers: `e2e` (marked in its module), `pipeline` (anything that loads a model: a fixture of
    MODEL_FIXTURES, directly or through another fixture, or marked so), `unit` (the rest): `pytest -m unit` runs
    the fast tier alone."""
    for item in items:
        if item.get_closest_marker("e2e") or item.get_closest_marker("pipeline"):
            continue
        names = set(getattr(item, "fixturenames", ()))
        fuzzed = getattr(getattr(item, "obj", None), "is_hypothesis_test", False)  # hypothesis: many examples
        item.add_marker(pytest.mark.pipeline if names & MODEL_FIXTURES or fuzzed else pytest.mark.unit)


def pytest_ignore_collect(collection_path, config):
    """`pytest -m unit` does not import the modules marked wholly `pipeline` or `e2e` (`pytestmark = ...` at the
    top: they hold no unit test, and importing them loads torch and the training stack)."""
    if config.option.markexpr != "unit" or collection_path.suffix != ".py":
        return None
    text = collection_path.read_text(encoding="utf-8")
    return True if re.search(r"^pytestmark = \[?\s*pytest\.mark\.(pipeline|e2e)\b", text, re.M) else None
