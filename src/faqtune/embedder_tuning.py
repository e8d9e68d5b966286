"""The retriever's embedder tuned on the FAQ's own question forms, as the index is built.

`tune_embedder` fine-tunes the sentence-transformers embedder with an in-batch contrastive loss (each form of an
entry's question -- the question, noisy spellings, key words -- pulled to that entry's question and to its
answer, away from the other entries in its batch), then mixes the tuned weights with the original ones
(WiSE-FT, Wortsman et al. 2022: `mix` x tuned + (1 - mix) x original), which keeps the gains on the FAQ's
phrasings and the original's robustness elsewhere. The forward passes run under bf16 autocast where this CPU runs
bf16 fast (`BF16`). Measured in benchmarks/README.md (`embedder_finetune.py`, `embedder_tuning_speed.py`).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from faqtune.data import FaqEntry
from faqtune.models import cpu_bf16_is_fast
from faqtune.retrieval import open_embedder
from faqtune.run import share_as_umask

BATCH = 32  # forms per batch; the in-batch negatives are the other entries of the batch
SCALE = 20.0  # cosine similarities x SCALE are the logits (sentence-transformers' MultipleNegativesRankingLoss)
LEARNING_RATE = 2e-5
MAX_TOKENS = 128  # texts cut to this while tuning (the index still embeds up to the model's own cap): a batch is
# padded to its longest text, so long answers made every batch as slow as the longest (benchmarks/README.md)
ANSWER_GRADIENTS = True  # False: the answers' vectors as fixed targets at each step (1.3x faster, but it lost 1-2
# shared-FAQ rephrasings at every seed: benchmarks/README.md, `embedder_tuning_speed.py`)
BF16 = "auto"  # bf16 autocast where this CPU runs bf16 fast (models.cpu_bf16_is_fast; the weights stay fp32):
# the same held-out figures as fp32 in every build measured, builds 1.6x faster; "never": fp32 everywhere


def batches_one_form_per_entry(anchors: list[tuple[str, int]], size: int) -> list[list[tuple[str, int]]]:
    """`anchors` ((form, entry)) in batches of `size` in which no entry appears twice: a batch's other entries
    are its negatives, so two forms of one entry must not be."""
    out, pool = [], list(anchors)
    while pool:
        seen, batch, rest = set(), [], []
        for form, i in pool:
            if i in seen or len(batch) >= size:
                rest.append((form, i))
            else:
                seen.add(i)
                batch.append((form, i))
        out.append(batch)
        pool = rest
    return out


def tune_embedder(name: str, entries: list[FaqEntry], anchors: list[tuple[str, int]], out_dir: str | Path,
                  epochs: int, mix: float, seed: int = 0) -> Path:
    """Tune embedder `name` (an alias, id or folder) for `epochs` on `anchors` ((form, index into `entries`)),
    mix it with the original by `mix`, and save it as a sentence-transformers folder `out_dir` (returned)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = open_embedder(name)  # its own copy: the tuning changes its weights
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)

    features = getattr(model, "preprocess", None) or model.tokenize  # `tokenize` before sentence-transformers 6

    def encode(texts: list[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(model(features(texts))["sentence_embedding"].float(), dim=-1)

    bf16 = BF16 == "auto" and cpu_bf16_is_fast()

    anchors = list(anchors)
    full_length = model.max_seq_length
    model.max_seq_length = min(full_length, MAX_TOKENS)
    model.train()
    for _ in range(epochs):
        rng.shuffle(anchors)
        for batch in batches_one_form_per_entry(anchors, BATCH):
            ids = [i for _, i in batch]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                forms = encode([f for f, _ in batch])
                questions = encode([entries[i].question for i in ids])
                with torch.set_grad_enabled(ANSWER_GRADIENTS):
                    answers = encode([entries[i].answer for i in ids])
            target = torch.arange(len(batch))
            loss = sum(torch.nn.functional.cross_entropy(SCALE * forms @ t.T, target) for t in (questions, answers))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    model.max_seq_length = full_length
    tuned = model.state_dict()
    model.load_state_dict({k: mix * v + (1 - mix) * original[k] if v.is_floating_point() else v
                           for k, v in tuned.items()})
    out_dir = Path(out_dir)
    model.save(str(out_dir))
    share_as_umask(out_dir)
    return out_dir
