"""Prompt formatting and answer-only labels: prompt masked, answer + EOS trained, same prompt at inference."""

from __future__ import annotations

import pytest

from faqtune.prompting import (
    GUIDE_TEMPLATE,
    IGNORE_INDEX,
    build_messages,
    encode_conversation,
    encode_prompt,
    ensure_chat_template,
    render,
)

QA = [{"role": "user", "content": "How do I return an item?"},
      {"role": "assistant", "content": "Send it back within 45 days."}]


def _trained(tokenizer, enc):
    return tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX])


def test_answer_and_eos_trained_prompt_masked(tiny_tokenizer):
    enc = encode_conversation(tiny_tokenizer, QA, max_seq_length=512)
    assert len(enc.input_ids) == len(enc.labels)
    assert _trained(tiny_tokenizer, enc) == "Send it back within 45 days.<|im_end|>"
    eos = tiny_tokenizer.eos_token_id
    eos_positions = [i for i, t in enumerate(enc.input_ids) if t == eos]
    # the user turn's <|im_end|> is prompt (masked); the answer's <|im_end|> is trained
    assert enc.labels[eos_positions[0]] == IGNORE_INDEX
    assert enc.labels[eos_positions[-1]] == eos
    assert enc.labels[-1] == IGNORE_INDEX  # the newline after EOS is not trained
    assert not enc.truncated


def test_pad_equal_to_eos_does_not_mask_eos(tiny_tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    eos = tiny_tokenizer.eos_token_id
    short = encode_conversation(tiny_tokenizer, QA, 512)
    long = encode_conversation(tiny_tokenizer, [QA[0], {"role": "assistant", "content": "A much longer answer " * 5}], 512)
    collator = DataCollatorForLanguageModeling(pad_token_id=eos)  # the guide's pad_token = eos_token
    batch = collator([{"input_ids": e.input_ids, "labels": e.labels} for e in (short, long)])
    row = batch["labels"][0].tolist()
    assert row[: len(short.labels)] == short.labels
    assert eos in row  # the answer's EOS survives padding with EOS
    assert all(x == IGNORE_INDEX for x in row[len(short.labels):])


def test_inference_prompt_is_training_prefix(tiny_tokenizer):
    enc = encode_conversation(tiny_tokenizer, QA, 512)
    prompt = encode_prompt(tiny_tokenizer, QA[:1])
    assert enc.input_ids[: len(prompt)] == prompt
    assert all(lab == IGNORE_INDEX for lab in enc.labels[: len(prompt)])
    assert enc.labels[len(prompt)] != IGNORE_INDEX  # the first answer token is trained


def test_multi_turn_trains_every_answer(tiny_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, *QA,
            {"role": "user", "content": "And refunds?"}, {"role": "assistant", "content": "Five days."}]
    enc = encode_conversation(tiny_tokenizer, msgs, 512)
    assert _trained(tiny_tokenizer, enc) == "Send it back within 45 days.<|im_end|>Five days.<|im_end|>"


def test_truncation_is_reported(tiny_tokenizer):
    full = encode_conversation(tiny_tokenizer, QA, 512)
    cut = encode_conversation(tiny_tokenizer, QA, len(full.input_ids) - 3)
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids) - 3
    assert cut.input_ids == full.input_ids[:-3]


def test_guide_template_when_tokenizer_has_none(tiny_base_no_template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_no_template)
    assert ensure_chat_template(tok) is True
    assert tok.chat_template == GUIDE_TEMPLATE
    assert render(tok, QA, add_generation_prompt=False) == (
        "<human>: How do I return an item?\n<assistant>: Send it back within 45 days.<|endoftext|>\n"
    )
    assert render(tok, QA[:1], add_generation_prompt=True) == "<human>: How do I return an item?\n<assistant>:"
    enc = encode_conversation(tok, QA, 512)
    assert _trained(tok, enc).strip() == "Send it back within 45 days.<|endoftext|>"
    assert ensure_chat_template(tok) is False  # installed once, then kept


@pytest.mark.parametrize("history", [None, [("Hi?", "Hello.")]])
def test_build_messages(history):
    msgs = build_messages("Where is my order?", history, system_prompt="You are Northwind's bot.")
    assert msgs[0] == {"role": "system", "content": "You are Northwind's bot."}
    assert msgs[-1] == {"role": "user", "content": "Where is my order?"}
    assert len(msgs) == 2 + 2 * len(history or [])
