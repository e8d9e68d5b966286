"""QLoRA training speed and memory: faqtune vs the guide's reference recipe, on a Llama-2-7B-shaped model.

    python benchmarks/gpu_train.py                 # on a GPU: random-weight Llama-2-7B shape, ~5 minutes
    python benchmarks/gpu_train.py --tiny          # anywhere (CPU too): a 2-layer model, seconds

The model is built from a config with random weights (no network, nothing to download), saved once as
safetensors and loaded 4-bit by each recipe. The training data are the bundled FAQ's examples tokenized
with the embedded default tokenizer when present (else synthetic lengths), ids folded into the vocabulary.
Each recipe trains `--steps` optimizer steps after `--warmup` untimed ones; reported: real (non-padding)
tokens/s and peak GPU memory. Rows:
  reference        the guide: NF4 no DQ, LoRA q/v, batch 1 x accumulation 4, padding, GC on
  faqtune-bs1      faqtune's training path at the reference's micro-batch (1 x 4, no packing)
  faqtune          faqtune's defaults (4 packed x 1, all-linear LoRA, DQ, GC auto)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {
    # Llama-2-7B: 32 layers, 4096 wide, 11008 MLP, 32 heads, 32k vocabulary
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}


def build_random_model(shape: str, folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         **SHAPES[shape])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def example_rows(vocab: int, n: int = 88) -> list[dict[str, list[int]]]:
    """(input_ids, labels) rows shaped like the bundled FAQ's training examples."""
    from faqtune.data import bundled_faq_path, load_faq
    from faqtune.prompting import encode_conversation

    try:
        from faqtune.models import ensure_embedded_model, load_tokenizer

        tokenizer = load_tokenizer(str(ensure_embedded_model()))
        rows = []
        for e in load_faq(bundled_faq_path()).entries[:n]:
            enc = encode_conversation(tokenizer, e.as_messages(), 512)
            rows.append({"input_ids": [t % vocab for t in enc.input_ids],
                         "labels": [t % vocab if t >= 0 else t for t in enc.labels]})
        return rows
    except Exception:  # no embedded model on this machine: synthetic rows of the same lengths
        rng = random.Random(0)
        rows = []
        for _ in range(n):
            p, a = rng.randint(40, 60), rng.randint(25, 60)
            ids = [rng.randrange(3, vocab) for _ in range(p + a)]
            rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
        return rows


class StepTimer(TrainerCallback):
    """Times optimizer steps after a warm-up (synchronizing the GPU around each step)."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self._t = warmup, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)


def _reset_memory():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def id_tokenizer():
    """A stand-in tokenizer: the rows are already token ids, so only pad/EOS (id 2) are needed."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<eos>": 2}, unk_token="<eos>")),
                                   eos_token="<eos>", pad_token="<eos>")


def run_reference(base: Path, rows, steps: int, warmup: int, out: str) -> dict:
    from reference_recipe import load_reference_model, train_reference

    _reset_memory()
    model = load_reference_model(str(base))
    tok = id_tokenizer()
    timer = StepTimer(warmup)
    ids = [r["input_ids"] for r in rows]
    train_reference(model, tok, None, out, max_steps=steps + warmup, token_rows=ids, callbacks=[timer])
    per_step_tokens = 4 * sum(map(len, ids)) / len(ids)
    del model
    return {"tokens_per_s": per_step_tokens * len(timer.times) / sum(timer.times), "peak_gib": _peak_gib()}


def run_faqtune(base: Path, rows, steps: int, warmup: int, out: str, batch: int, accum: int, packing: bool) -> dict:
    from faqtune.config import load_config
    from faqtune.models import attach_lora, load_base_model
    from faqtune.run import RunDir
    from faqtune.train import TokenizedSplit, build_trainer

    _reset_memory()
    cfg = load_config(None, {"output_dir": out, "train.max_steps": steps + warmup, "train.batch_size": batch,
                             "train.gradient_accumulation_steps": accum, "train.packing": packing,
                             "train.save_steps": 10_000, "train.eval_steps": 0, "data.eval_fraction": 0})
    model = attach_lora(load_base_model(str(base), cfg), cfg)
    timer = StepTimer(warmup)
    trainer = build_trainer(cfg, RunDir(out), model, id_tokenizer(), TokenizedSplit(rows), TokenizedSplit([]),
                            callbacks=(timer,))
    trainer.train()
    per_step_tokens = batch * accum * sum(len(r["input_ids"]) for r in rows) / len(rows)
    del trainer, model
    return {"tokens_per_s": per_step_tokens * len(timer.times) / sum(timer.times), "peak_gib": _peak_gib()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script anywhere in seconds")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    shape = "tiny" if args.tiny else "llama2-7b"
    work = Path(tempfile.mkdtemp(prefix="faqtune-gpu-"))
    t0 = time.time()
    base = build_random_model(shape, work / "base")
    print(f"built a random {shape} model in {time.time() - t0:.0f}s", flush=True)
    rows = example_rows(SHAPES[shape]["vocab_size"])
    results = {}
    runs = [("reference", lambda: run_reference(base, rows, args.steps, args.warmup, str(work / "ref"))),
            ("faqtune-bs1", lambda: run_faqtune(base, rows, args.steps, args.warmup, str(work / "f1"), 1, 4, False)),
            ("faqtune", lambda: run_faqtune(base, rows, args.steps, args.warmup, str(work / "f4"), 4, 1, True))]
    for name, fn in runs:
        t0 = time.time()
        results[name] = fn()
        print(f"{name}: {results[name]} ({time.time() - t0:.0f}s)", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{shape} on {device}, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'recipe':12s} {'tokens/s':>10s} {'vs ref':>7s} {'peak GiB':>9s}")
    ref = results["reference"]["tokens_per_s"]
    for name, r in results.items():
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{name:12s} {r['tokens_per_s']:10.1f} {r['tokens_per_s'] / ref:7.2f} {peak:>9s}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "device": device, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
