"""The one prompt format, shared by training and inference, and answer-only labels.

The tokenizer's chat template is used when it has one; otherwise the guide's
`<human>: {question}` / `<assistant>: {answer}` template is installed as the chat template, so the
run's saved tokenizer carries it to inference. A conversation is tokenized segment by segment (prompt
segments masked, assistant answers + EOS trained) exactly as inference tokenizes a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100

# The original guide's format; EOS closes each answer so the model learns to stop.
GUIDE_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<human>: ' + m['content'] + '\n' }}"
    "{% else %}{{ '<assistant>: ' + m['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>:' }}{% endif %}"
)

# Strings that must never appear in a clean answer.
TEMPLATE_MARKERS = ("<human>:", "<assistant>:", "<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>")


def ensure_chat_template(tokenizer) -> bool:
    """Install the guide's template when the tokenizer has none; returns True if it did."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = GUIDE_TEMPLATE
    return True


def build_messages(question: str, history: list[tuple[str, str]] | None = None,
                   system_prompt: str | None = None) -> list[dict[str, str]]:
    """(history of (question, answer) pairs, new question) -> chat messages."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for q, a in history or []:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    return messages


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The conversation as text, through the chat template (the only formatting function)."""
    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_text(tokenizer, text: str, first: bool) -> list[int]:
    """Token ids of one rendered segment; BOS is added once, at the start, unless the template wrote it."""
    bos = tokenizer.bos_token
    add_special = first and not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids for generation (ends with the assistant header)."""
    return encode_text(tokenizer, render(tokenizer, messages, add_generation_prompt=True), first=True)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def _answer_segment(tokenizer, text: str) -> tuple[str, str]:
    """Split an assistant turn's text into (trained part up to and including EOS, untrained rest)."""
    eos = tokenizer.eos_token
    if eos and eos in text:
        cut = text.index(eos) + len(eos)
        return text[:cut], text[cut:]
    # The template ends turns with something other than EOS: append EOS so the model learns to stop.
    return text + (eos or ""), ""


def encode_conversation(tokenizer, messages: list[dict[str, str]], max_seq_length: int) -> Encoded:
    """Token ids + labels: every assistant answer and its EOS trained, everything else -100."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # text rendered so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render conversations as growing prefixes")
        prompt_ids = encode_text(tokenizer, prompt[len(done):], first=not ids)
        trained, rest = _answer_segment(tokenizer, full[len(prompt):])
        answer_ids = encode_text(tokenizer, trained, first=False)
        rest_ids = encode_text(tokenizer, rest, first=False) if rest else []
        ids += prompt_ids + answer_ids + rest_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [IGNORE_INDEX] * len(rest_ids)
        done = full
    truncated = len(ids) > max_seq_length
    return Encoded(ids[:max_seq_length], labels[:max_seq_length], truncated)
