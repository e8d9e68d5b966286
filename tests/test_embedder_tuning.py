"""The retriever's embedder tuned on the FAQ's own question forms as the index is built (`embedder_tuning`): batches
whose negatives are other entries, the WiSE-FT mix, and a tuned embedder stored inside the index it built."""

from __future__ import annotations

import shutil

import pytest

from faqtune.config import load_config
from faqtune.data import FaqEntry
from faqtune.embedder_tuning import batches_one_form_per_entry
from faqtune.errors import ConfigError


def _entries(n: int = 8) -> list[FaqEntry]:
    return [FaqEntry((("user", f"How do I do thing number {i}?"), ("assistant", f"Thing {i} is on page {i}.")))
            for i in range(n)]


def test_a_batch_never_holds_two_forms_of_one_entry():
    anchors = [(f"form {k} of {i}", i) for i in range(5) for k in range(3)] + [("extra", 0)]
    batches = batches_one_form_per_entry(anchors, size=4)
    assert sorted(a for b in batches for a in b) == sorted(anchors)
    for batch in batches:
        ids = [i for _, i in batch]
        assert len(ids) == len(set(ids)) and len(batch) <= 4


def test_the_mix_and_epochs_are_checked():
    with pytest.raises(ConfigError, match="grounding.embedder_mix"):
        load_config(None, {"grounding.embedder_mix": "1.5"})
    with pytest.raises(ConfigError, match="grounding.embedder_epochs"):
        load_config(None, {"grounding.embedder_epochs": "-1"})


@pytest.mark.pipeline
def test_mix_zero_is_the_original_and_tuning_moves_it(tmp_path):
    import numpy as np

    from faqtune.embedder_tuning import tune_embedder
    from faqtune.retrieval import DEFAULT_EMBEDDER, embed

    entries = _entries()
    anchors = [(f"thing {i} help", i) for i in range(len(entries))] + [(e.question, i) for i, e in enumerate(entries)]
    texts = ["thing 3 help", "where is page 5"]
    stock = embed(DEFAULT_EMBEDDER, texts)
    kept = tune_embedder(DEFAULT_EMBEDDER, entries, anchors, tmp_path / "mix0", epochs=2, mix=0.0)
    tuned = tune_embedder(DEFAULT_EMBEDDER, entries, anchors, tmp_path / "mix1", epochs=2, mix=1.0)
    assert np.allclose(embed(str(kept), texts), stock, atol=1e-5)
    assert not np.allclose(embed(str(tuned), texts), stock, atol=1e-3)


@pytest.mark.pipeline
def test_a_tuned_embedder_lives_in_its_index_which_can_move(tmp_path):
    from faqtune.grounding import build_index
    from faqtune.retrieval import FaqIndex

    entries = _entries()
    cfg = load_config(None, {"grounding.embedder_epochs": "1", "grounding.threshold": "0.3"})
    index = build_index(tmp_path / "index", entries, cfg)
    name = index.meta["embedder"]
    assert name.startswith("./embedder-") and (tmp_path / "index" / name[2:] / "config.json").is_file()
    shutil.move(tmp_path / "index", tmp_path / "moved")
    moved = FaqIndex(tmp_path / "moved")
    assert moved.embedder == str(tmp_path / "moved" / name[2:])
    assert [h[0].id for h in moved.search_many([e.question for e in entries], k=1)] == list(range(len(entries)))
    rebuilt = build_index(tmp_path / "moved", entries, cfg)  # rebuilt in place: a new folder, never a stale cache
    assert rebuilt.meta["embedder"] != name
    assert not (tmp_path / "moved" / name[2:]).exists()


@pytest.mark.pipeline
def test_without_epochs_the_index_names_the_shipped_embedder(tmp_path):
    from faqtune.grounding import build_index
    from faqtune.retrieval import DEFAULT_EMBEDDER

    cfg = load_config(None, {"grounding.embedder_epochs": "0", "grounding.threshold": "0.3"})
    index = build_index(tmp_path / "index", _entries(), cfg)
    assert index.meta["embedder"] == DEFAULT_EMBEDDER and index.embedder == DEFAULT_EMBEDDER
    assert not list((tmp_path / "index").glob("embedder-*"))


@pytest.mark.pipeline
def test_tuning_cuts_long_texts_and_the_saved_embedder_keeps_its_own_cap(tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    from faqtune import embedder_tuning
    from faqtune.retrieval import DEFAULT_EMBEDDER

    lengths = []
    forward = SentenceTransformer.forward

    def spy(self, features, *args, **kwargs):
        lengths.append(features["input_ids"].shape[1])
        return forward(self, features, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "forward", spy)
    monkeypatch.setattr(embedder_tuning, "MAX_TOKENS", 16)
    entries = [FaqEntry((("user", f"How do I do thing number {i}?"), ("assistant", "Long answer. " * 60)))
               for i in range(4)]
    anchors = [(e.question, i) for i, e in enumerate(entries)]
    out = embedder_tuning.tune_embedder(DEFAULT_EMBEDDER, entries, anchors, tmp_path / "tuned", epochs=1, mix=1.0)
    assert lengths and max(lengths) == 16  # the answers (~130 tokens) were cut while tuning
    assert SentenceTransformer(str(out), device="cpu").max_seq_length == 256  # what the index embeds with


@pytest.mark.pipeline
@pytest.mark.parametrize("bf16_fast", [True, False])
def test_tuning_runs_in_bf16_only_where_this_cpu_runs_it_fast_and_saves_fp32(tmp_path, monkeypatch, bf16_fast):
    import torch
    from sentence_transformers import SentenceTransformer

    from faqtune import embedder_tuning
    from faqtune.retrieval import DEFAULT_EMBEDDER

    autocast = []
    forward = SentenceTransformer.forward

    def spy(self, features, *args, **kwargs):
        autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return forward(self, features, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "forward", spy)
    monkeypatch.setattr(embedder_tuning, "cpu_bf16_is_fast", lambda: bf16_fast)
    entries = _entries(4)
    out = embedder_tuning.tune_embedder(DEFAULT_EMBEDDER, entries, [(e.question, i) for i, e in enumerate(entries)],
                                        tmp_path / "tuned", epochs=1, mix=1.0)
    assert autocast and set(autocast) == {bf16_fast}
    saved = SentenceTransformer(str(out), device="cpu")
    assert {p.dtype for p in saved.parameters()} == {torch.float32}


@pytest.mark.pipeline
def test_each_open_index_keeps_its_own_tuned_embedder_loaded(tmp_path, monkeypatch):
    """Every run's index carries its own tuned embedder, and `serve` holds many runs: searching them in turn must
    not load an embedder from disk again and again (an LRU cache of a few embedders alone did, past its size)."""
    from sentence_transformers import SentenceTransformer

    from faqtune.grounding import build_index
    from faqtune.retrieval import FaqIndex, load_embedder

    entries = _entries()
    cfg = load_config(None, {"grounding.embedder_epochs": "1", "grounding.threshold": "0.3"})
    build_index(tmp_path / "run0", entries, cfg)
    for n in range(1, 6):  # six runs' indexes, each with its own embedder folder
        shutil.copytree(tmp_path / "run0", tmp_path / f"run{n}")
    indexes = [FaqIndex(tmp_path / f"run{n}") for n in range(6)]
    assert len({i.embedder for i in indexes}) == 6
    load_embedder.cache_clear()
    loads = []
    init = SentenceTransformer.__init__

    def counted(self, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("model_name_or_path"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "__init__", counted)
    for _ in range(3):
        for index in indexes:
            assert index.search("thing number 3", k=1)[0].id == 3
    assert len(loads) == 6
