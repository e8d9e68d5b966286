"""Answering: prompt with the training format, generate, return clean answers that stop at EOS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from faqtune.config import GenerationConfig
from faqtune.errors import PromptTooLong
from faqtune.prompting import TEMPLATE_MARKERS, build_messages, encode_prompt


@dataclass
class Answer:
    text: str
    stopped: bool  # ended with EOS before max_new_tokens
    new_tokens: int
    prompt_tokens: int
    raw: str = ""  # the generated text before cleaning (special tokens kept), to count template leaks
    source: dict | None = None  # grounding: {"id", "question", "score"} of the FAQ entry it came from
    declined: bool = False  # grounding: no FAQ entry was close enough, so the bot declined
    related: tuple[dict, ...] = ()  # grounding: other FAQ entries offered with it ({"id", "question", "score"})


def stop_token_ids(tokenizer, model) -> list[int]:
    """EOS ids the generation stops on: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)


def clean(text: str) -> str:
    """Cut anything after a template marker the model might still emit, and trim whitespace."""
    for marker in TEMPLATE_MARKERS:
        cut = text.find(marker)
        if cut != -1:
            text = text[:cut]
    return text.strip()


# (indices of the conversations generated for, left-padded prompt width) -> the batch's stopping criteria
Stopping = Callable[[list[int], int], StoppingCriteria]


class Answerer:
    """Holds a model + tokenizer and answers questions (single, batched, or with chat history)."""

    def __init__(self, model, tokenizer, gen: GenerationConfig, system_prompt: str | None = None):
        self.model, self.tokenizer, self.gen, self.system_prompt = model, tokenizer, gen, system_prompt
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        # the model's context in tokens (0: not known); a prompt must fit in it, and the answer ends where it does
        self.context = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 0)

    def _generate_kwargs(self, gen: GenerationConfig) -> dict:
        kwargs = {
            "max_new_tokens": gen.max_new_tokens,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.pad_id,
            "repetition_penalty": gen.repetition_penalty,
            "num_return_sequences": gen.num_return_sequences,
            "use_cache": True,
        }
        if gen.temperature > 0:
            kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    # Hooks for answerers that change the prompt or answer without generating (grounding): `prepare` gives
    # each conversation to generate from (None: answer it with `unanswered` instead) and a context that
    # `finish` gets back with the generated answer.
    def prepare(self, conversations: list[list[dict[str, str]]]) -> list[tuple[list[dict[str, str]] | None, Any]]:
        return [(c, None) for c in conversations]

    def finish(self, answer: Answer, context: Any) -> Answer:
        return answer

    def unanswered(self, context: Any) -> Answer:
        raise NotImplementedError

    def answer_batch(self, conversations: list[list[dict[str, str]]], gen: GenerationConfig | None = None,
                     stopping: Stopping | None = None) -> list[list[Answer]]:
        """Answer several conversations at once (left-padded batch); one list of answers per conversation.

        `stopping(generated, width)`, if given, makes the `StoppingCriteria` generate() calls after every
        decoding step, from the indices of the conversations that are generated for (the others were answered
        without generating) and the batch's left-padded prompt width (`faqtune serve` streams and cancels
        rows with it)."""
        gen = gen or self.gen
        prepared = self.prepare(conversations)
        todo = [i for i, (conv, _) in enumerate(prepared) if conv is not None]
        criteria = (lambda width: stopping(todo, width)) if stopping is not None else None
        generated = self.generate([prepared[i][0] for i in todo], gen, criteria) if todo else []
        out = [[self.unanswered(ctx) for _ in range(gen.num_return_sequences)] if conv is None else []
               for conv, ctx in prepared]
        for i, group in zip(todo, generated, strict=True):
            out[i] = [self.finish(a, prepared[i][1]) for a in group]
        return out

    @torch.inference_mode()
    def generate(self, conversations: list[list[dict[str, str]]], gen: GenerationConfig,
                 stopping: Callable[[int], StoppingCriteria] | None = None) -> list[list[Answer]]:
        """Generate for conversations as given (left-padded batch): one list of answers per conversation.
        `stopping(width)` makes a StoppingCriteria for the batch, given its prompt width."""
        prompts = [encode_prompt(self.tokenizer, msgs) for msgs in conversations]
        width = max(len(p) for p in prompts)
        context = self.context
        if context and width >= context:  # positions past the context: the model would answer noise, or fail
            raise PromptTooLong(f"the prompt is {width} tokens (the question with its system prompt, FAQ entries "
                                f"and history), longer than the model's context of {context} tokens: "
                                "shorten the question")
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        kwargs = self._generate_kwargs(gen)
        if context:  # the answer ends where the context does
            kwargs["max_new_tokens"] = min(gen.max_new_tokens, context - width)
        if len(prompts) == 1 and gen.temperature == 0 and gen.num_return_sequences == 1 and gen.prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = gen.prompt_lookup  # greedy output unchanged; fewer forwards
        if stopping is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([stopping(width)])
        out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new = out[:, width:].tolist()
        answers: list[list[Answer]] = []
        for i, prompt in enumerate(prompts):
            group = []
            for seq in new[i * gen.num_return_sequences:(i + 1) * gen.num_return_sequences]:
                stop = next((j for j, t in enumerate(seq) if t in self.stop_ids), None)
                kept = seq if stop is None else seq[:stop]
                text = clean(self.tokenizer.decode(kept, skip_special_tokens=True))
                raw = self.tokenizer.decode(kept, skip_special_tokens=False)
                group.append(Answer(text, stop is not None, len(kept) + (stop is not None), len(prompt), raw))
            answers.append(group)
        return answers

    def messages(self, question: str, history: list[tuple[str, str]] | None = None) -> list[dict[str, str]]:
        return build_messages(question, history, self.system_prompt)

    def ask(self, question: str, history: list[tuple[str, str]] | None = None) -> list[Answer]:
        return self.answer_batch([self.messages(question, history)])[0]

    def ask_many(self, questions: list[str], batch_size: int = 8) -> list[Answer]:
        """First answer to each question, batched."""
        out: list[Answer] = []
        for i in range(0, len(questions), batch_size):
            chunk = [self.messages(q) for q in questions[i:i + batch_size]]
            out += [group[0] for group in self.answer_batch(chunk)]
        return out
