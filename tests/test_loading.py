"""One way to load a run: `loading.open_run` resolves what every command names (a run directory, a pushed adapter
folder), `serve` takes the same, and `Answerer.answer_batch` is the one answering path (its stopping hook is
what `faqtune serve` streams and cancels with)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import StoppingCriteria

from faqtune.config import FaqtuneConfig, GenerationConfig
from faqtune.generate import Answer, Answerer
from faqtune.loading import load_adapters, open_run
from faqtune.prompting import encode_prompt
from faqtune.serve.jobs import check_runs


def _base(tmp_path: Path) -> Path:
    """A folder that passes for a local base (its config.json); no weights: nothing here loads them."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    return tmp_path / "base"


def _run_dir(root: Path, base: Path, **generation) -> Path:
    """A run directory with its settings and an adapter config (no weights: nothing here loads them)."""
    (root / "adapter").mkdir(parents=True)
    cfg = FaqtuneConfig(output_dir=str(root), base_model=str(base))
    for key, value in generation.items():
        setattr(cfg.generation, key, value)
    cfg.save(root / "config.yaml")
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 4}))
    return root


def _adapter_folder(root: Path, base: Path) -> Path:
    """What `faqtune push` uploads: adapter and tokenizer side by side, no run layout."""
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 4}))
    (root / "tokenizer_config.json").write_text("{}")
    return root


def test_open_run_finds_each_artifact_of_a_run_and_of_a_pushed_adapter(tmp_path):
    base = _base(tmp_path)
    run = open_run(_run_dir(tmp_path / "run", base))
    assert (run.adapter_dir, run.tokenizer_dir, run.base) == (tmp_path / "run" / "adapter",
                                                              tmp_path / "run" / "tokenizer", str(base))
    pushed = open_run(_adapter_folder(tmp_path / "pushed", base))
    assert (pushed.adapter_dir, pushed.tokenizer_dir, pushed.cfg.base_model) == (tmp_path / "pushed",
                                                                                  tmp_path / "pushed", str(base))


def test_serve_takes_a_pushed_adapter_folder_as_ask_does(tmp_path):
    base = _base(tmp_path)
    runs, shared = check_runs([f"bot={_adapter_folder(tmp_path / 'pushed', base)}", str(_run_dir(tmp_path / 'run', base))])
    assert [(name, run.adapter_dir) for name, run, _ in runs] == [("bot", tmp_path / "pushed"),
                                                                   ("run", tmp_path / "run" / "adapter")]
    assert shared == str(base)


def test_serve_says_it_does_not_merge(tmp_path, caplog):
    base = _base(tmp_path)
    caplog.set_level(logging.WARNING, logger="faqtune.serve")
    check_runs([str(_run_dir(tmp_path / "run", base, merged="bf16"))])
    assert any("generation.merged 'bf16' is not used by serve" in r.getMessage() for r in caplog.records)
    caplog.clear()
    check_runs([str(_run_dir(tmp_path / "default", base))])  # `auto` (the default): merge where it pays; here not
    assert not any("generation.merged" in r.getMessage() for r in caplog.records)


# ---- the one answering path ---------------------------------------------------------------------------------

class SecondAnsweredWithoutGenerating(Answerer):
    """As grounding declines an off-topic question: the second conversation never reaches generate()."""

    def prepare(self, conversations):
        return [(None, "off-topic") if i == 1 else (c, None) for i, c in enumerate(conversations)]

    def unanswered(self, context):
        return Answer(f"declined ({context})", True, 0, 0)


class StopAtOnce(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def test_answer_batch_stopping_sees_only_the_generated_rows_and_their_prompt_width(tiny_base, tiny_tokenizer):
    model = load_adapters(str(tiny_base), FaqtuneConfig(base_model=str(tiny_base)), {})
    bot = SecondAnsweredWithoutGenerating(model, tiny_tokenizer, GenerationConfig(max_new_tokens=6))
    conversations = [[{"role": "user", "content": q}] for q in ("short?", "ignored", "a much longer question?")]
    seen: list[tuple[list[int], int]] = []

    def stopping(generated: list[int], width: int) -> StoppingCriteria:
        seen.append((generated, width))
        return StopAtOnce()

    answers = bot.answer_batch(conversations, stopping=stopping)
    width = max(len(encode_prompt(tiny_tokenizer, conversations[i])) for i in (0, 2))
    assert seen == [([0, 2], width)]
    assert answers[1][0].text == "declined (off-topic)"
    assert [answers[i][0].new_tokens for i in (0, 2)] == [1, 1]  # stopped after the first decoding step
    free = bot.answer_batch(conversations)  # without the hook the same rows go on
    assert max(free[i][0].new_tokens for i in (0, 2)) > 1


@pytest.mark.parametrize("spec", ["owner/no-such-adapter"])
def test_a_hub_id_that_cannot_be_fetched_is_one_line(spec, monkeypatch):
    import huggingface_hub.constants

    from faqtune.errors import ModelError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read once when imported: its constant too (no network retries)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="not in the Hugging Face cache, and the Hub cannot be reached") as e:
        open_run(spec)
    assert "\n" not in str(e.value)


def test_no_run_may_be_served_under_the_base_models_name(tmp_path):
    from faqtune.errors import ModelError
    from faqtune.serve.jobs import served_base_name

    base = _base(tmp_path)
    runs, _ = check_runs([str(_run_dir(tmp_path / "run", base))])
    assert served_base_name(runs) == "base"  # a local base is served under its folder's name
    clash, _ = check_runs([f"base={_run_dir(tmp_path / 'other', base)}"])
    with pytest.raises(ModelError, match="the run name 'base' is the base model's name"):
        served_base_name(clash)


def test_eval_takes_merged_none_however_spelt_and_refuses_the_rest():
    from faqtune.errors import FaqtuneError
    from faqtune.evaluate import check_merged

    for merged in (None, "none", "NONE"):
        check_merged(merged)
    with pytest.raises(FaqtuneError, match="eval takes no --merged BF16"):
        check_merged("BF16")
