"""Streaming under every decoding setting (issue 15), on a live server over a model that really copies.

A random tiny model never copies a span from its prompt, so prompt-lookup decoding there accepts at most
repeats of one token, and a stream that drops tokens still looks right. `copy_model` is a genuine
LlamaForCausalLM (one layer with zeroed attention and MLP, identity embeddings: a bigram table in
`lm_head`) that answers SENTENCE token by token; with SENTENCE in the prompt, transformers' prompt lookup
accepts up to 11 tokens per step, as it does for a grounded answer copying its FAQ entry.
"""

from __future__ import annotations

import json

import pytest
from test_serve import _chrome, request

SENTENCE = "Returns are accepted within thirty days of delivery, with the receipt."


def copy_model(tokenizer, sentence: str = SENTENCE):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from faqtune.prompting import encode_prompt

    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    assert len(set(ids)) == len(ids), "a bigram chain needs distinct tokens"
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=vocab, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=eos, pad_token_id=eos, bos_token_id=None)
    model = LlamaForCausalLM(config)
    after = dict(zip(ids, [*ids[1:], eos], strict=True))
    after[encode_prompt(tokenizer, [{"role": "user", "content": "x"}])[-1]] = ids[0]  # the assistant header
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.model.norm.weight.fill_(1.0)
        for token in range(vocab):
            model.lm_head.weight[after.get(token, eos), token] = 1.0
    return model.eval()


@pytest.fixture(scope="module")
def copy_server(tiny_tokenizer):
    from faqtune.config import GenerationConfig
    from faqtune.generate import Answerer
    from faqtune.serve.app import create_app
    from faqtune.serve.engine import ServedModel, ServedModels
    from faqtune.serve.http import ServeLimits, ServerThread

    model = copy_model(tiny_tokenizer)
    entries = {name: ServedModel(name, Answerer(model, tiny_tokenizer, GenerationConfig(prompt_lookup=lookup)),
                                 None, tiny_tokenizer, 512)
               for name, lookup in (("lookup", 10), ("plain", 0))}
    with ServerThread(create_app(ServedModels(entries), ServeLimits())) as url:
        yield url


def streamed(url: str, body: dict) -> dict[int, str]:
    """Each choice's concatenated deltas in a streamed answer (raw HTTP, server-sent events)."""
    status, _, text = request(url, body={**body, "stream": True}, key=None)
    assert status == 200, text
    out: dict[int, str] = {}
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices", []):
                out[choice["index"]] = out.get(choice["index"], "") + (choice["delta"].get("content") or "")
    return out


QUESTIONS = ["When can I return it?", f"Is this right: {SENTENCE}", f"{SENTENCE} {SENTENCE}"]
SETTINGS = [{"model": "lookup"}, {"model": "plain"}, {"model": "lookup", "n": 2},
            {"model": "lookup", "stop": [" of"]}, {"model": "lookup", "max_tokens": 9}]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_streamed_equals_non_streamed_for_every_decoding_setting(copy_server, settings):
    for question in QUESTIONS:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 40, **settings}
        status, _, whole = request(copy_server, body=body, key=None)
        assert status == 200, whole
        texts = {c["index"]: c["message"]["content"] for c in whole["choices"]}
        assert streamed(copy_server, body) == texts, (settings, question)
        if "stop" not in settings and "max_tokens" not in settings:
            assert texts[0] == SENTENCE  # the model copies: the case that prompt lookup speeds up


def test_chat_page_streams_the_whole_answer(copy_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    question = f"Is this right: {SENTENCE}"
    status, _, whole = request(copy_server, body={"model": "lookup", "messages": [{"role": "user",
                                                                                   "content": question}]}, key=None)
    assert status == 200 and whole["choices"][0]["message"]["content"] == SENTENCE
    browser = _chrome()
    try:
        browser.get(copy_server + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model option")) == 2)
        browser.find_element(By.CSS_SELECTOR, "#model option[value='lookup']").click()
        browser.find_element(By.ID, "question").send_keys(question)
        browser.find_element(By.ID, "send").click()
        bubble = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".msg.assistant[data-state='done'], .msg.error"))
        assert bubble.text.strip() == SENTENCE
    finally:
        browser.quit()


DECLINE = "Sorry, that is not covered here."


class StubIndex:
    """A FAQ index that always finds the same two entries (no embedder needed)."""

    threshold = 0.3

    def search_many(self, queries, k=3, hybrid=False):
        from faqtune.retrieval import Hit

        hits = [Hit(7, "When can I return it?", SENTENCE, 0.9), Hit(2, "Do you ship abroad?", "Yes, worldwide.", 0.5)]
        return [hits[:k] for _ in queries]


@pytest.fixture(scope="module")
def declining_server(tiny_tokenizer):
    """A grounded model whose every answer is the decline message: `grounding.fallback` replaces it by the top
    entry's answer, which the stream must show too (not the decline it was generating)."""
    from faqtune.config import FaqtuneConfig
    from faqtune.grounding import GroundedAnswerer
    from faqtune.serve.app import create_app
    from faqtune.serve.engine import ServedModel, ServedModels
    from faqtune.serve.http import ServerThread

    cfg = FaqtuneConfig()
    cfg.grounding.decline_message, cfg.grounding.top_k = DECLINE, 2
    model = copy_model(tiny_tokenizer, DECLINE)
    answerer = GroundedAnswerer(model, tiny_tokenizer, cfg.generation, None, StubIndex(), cfg)
    entries = {"grounded": ServedModel("grounded", answerer, None, tiny_tokenizer, 512)}
    with ServerThread(create_app(ServedModels(entries))) as url:
        yield url


@pytest.mark.parametrize("n", [1, 2])
def test_a_replaced_decline_streams_the_replacement(declining_server, n):
    body = {"model": "grounded", "messages": [{"role": "user", "content": "When can I return it?"}], "n": n}
    status, _, whole = request(declining_server, body=body, key=None)
    assert status == 200 and [c["message"]["content"] for c in whole["choices"]] == [SENTENCE] * n
    assert whole["choices"][0]["faqtune_citation"]["verbatim"] is True and whole["usage"]["completion_tokens"] > 0
    assert streamed(declining_server, body) == dict.fromkeys(range(n), SENTENCE)


def test_an_entry_said_verbatim_keeps_to_max_tokens(declining_server, tiny_tokenizer):
    """The replacement went out whole whatever `max_tokens` asked for, finish "stop", counted as the decline
    it replaced."""
    ids = tiny_tokenizer(DECLINE, add_special_tokens=False)["input_ids"]  # cut where three words of it are said
    cut = next(n for n in range(1, len(ids)) if len(tiny_tokenizer.decode(ids[:n]).split()) >= 3)
    body = {"model": "grounded", "messages": [{"role": "user", "content": "When can I return it?"}], "n": 2,
            "max_tokens": cut}
    status, _, whole = request(declining_server, body=body, key=None)
    first_words = tiny_tokenizer.decode(tiny_tokenizer(SENTENCE, add_special_tokens=False)["input_ids"][:cut])
    assert status == 200 and [c["message"]["content"] for c in whole["choices"]] == [first_words] * 2
    assert [c["finish_reason"] for c in whole["choices"]] == ["length"] * 2
    assert whole["usage"]["completion_tokens"] == 2 * cut
    assert streamed(declining_server, body) == dict.fromkeys(range(2), first_words)
    whole = request(declining_server, body={**body, "max_tokens": 400}, key=None)[2]
    assert whole["choices"][0]["finish_reason"] == "stop" and whole["choices"][0]["message"]["content"] == SENTENCE
    assert whole["usage"]["completion_tokens"] == 2 * len(tiny_tokenizer(SENTENCE, add_special_tokens=False)["input_ids"])
