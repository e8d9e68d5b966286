"""faqtune vs the original guide's recipe, side by side on this machine: time-to-quality, throughput, memory.

    python benchmarks/cpu_speed.py                 # both recipes on ../shared/data/ecommerce_faq.json (~20 min, 2 cores)
    python benchmarks/cpu_speed.py --scale         # also: bank FAQ per-example cost, 100k-row JSONL read
    python benchmarks/cpu_speed.py --set train.epochs=6    # faqtune override

Each recipe trains in its own subprocess (peak RSS from the kernel: training's own high-water mark, and the
whole process's when it exits; faqtune's largest child process, the one that builds the index, beside it);
faqtune's probes search the run's index once, in a child process, as training builds it. Both train on
all 79 pairs and are scored on those 79 questions with the foundation's answer accuracy (a generated answer
must be closer, ROUGE-L, to its own reference than to any other answer). faqtune is scored before its first step and at steps along
the way (the clock is paused while it answers) to find its time-to-quality: training seconds until its
accuracy reaches the reference recipe's final figure (its setup -- grounding's index and threshold -- is
reported beside it as setup_seconds).

FLOP accounting (training, per real token): the frozen 4-bit base costs a forward (2N) and a backward
through its activations (2N), N = base linear parameters; LoRA adapters cost 6 x their parameters; the LM
head (2 x vocab x hidden forward, 2x backward) counts for the positions the recipe projects (every position
for the reference, answer positions for faqtune). Attention score FLOPs are added (4 x seq x hidden per
layer and token, x3 for training). The peak is a 2048^3 fp32 (and bf16) matmul measured in the same run.
Writes benchmarks/results/<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import commit, machine, status_gib, write_result  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from faqtune.generate import Answerer  # noqa: E402
from faqtune.memory import in_fresh_process  # noqa: E402

SHARED_FAQ = ROOT.parent / "shared" / "data" / "ecommerce_faq.json"
BANK_FAQ = ROOT.parent / "shared" / "data" / "bank_faq.csv"
SCHEDULE = (0.05, 0.1, 0.15, 0.25, 0.5, 1.0)  # shares of faqtune's steps at which accuracy is measured
LATENCY_QUESTIONS = 20  # answered one at a time for the p50 latency
LIMIT = int(os.environ.get("CPU_SPEED_QUESTIONS", "0")) or None  # smoke runs: score only the first N


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 6) -> float:
    """FLOP/s of a best-of-`reps` n^3 matmul (`dtype_name` a torch dtype name)."""
    import torch

    from faqtune.models import matmul_seconds

    return 2 * n**3 / matmul_seconds(getattr(torch, dtype_name), (n, n, n), reps)


def linear_params(model) -> tuple[int, int]:
    """(frozen base linear parameters, LoRA parameters) of a PEFT model on a 4-bit base."""
    base = lora = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            lora += p.numel()
        elif p.ndim == 2 and "embed" not in name:
            base += p.numel() * (2 if p.dtype == __import__("torch").uint8 else 1)  # 4-bit: two per byte
    return base, lora


def train_flops(cfg_model, base_linear: int, lora: int, tokens: int, head_positions: int, seq: float) -> float:
    hidden, layers, vocab = cfg_model.hidden_size, cfg_model.num_hidden_layers, cfg_model.vocab_size
    head = 2 * vocab * hidden
    body = base_linear - (vocab * hidden if not cfg_model.tie_word_embeddings else 0)
    attention = 3 * 4 * seq * hidden * layers
    return tokens * (4 * body + 6 * lora + attention) + head_positions * 3 * head


def bits_per_param(model) -> float:
    """Storage bits of the quantized linear weights, quantization constants included, per weight."""
    import bitsandbytes as bnb

    bits = params = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = m.weight
            qs = w.quant_state
            n = qs.shape.numel() if hasattr(qs.shape, "numel") else int(__import__("math").prod(qs.shape))
            params += n
            bits += w.numel() * w.element_size() * 8 + qs.absmax.numel() * qs.absmax.element_size() * 8
            if qs.nested:
                bits += qs.state2.absmax.numel() * qs.state2.absmax.element_size() * 8 + 32  # + offset
    return bits / max(1, params)


class TrainingPeak:
    """Peak RSS of training alone: the kernel's high-water mark (VmHWM), read before each probe and at the end
    of training, and reset after each probe (/proc/self/clear_refs) so the probes' answering is left out."""

    def __init__(self):
        self.gib = 0.0

    @staticmethod
    def hwm_gib() -> float:
        return status_gib("VmHWM")

    def note(self) -> None:
        self.gib = max(self.gib, self.hwm_gib())

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux: the whole-process peak stays the only figure


def score(texts: list[str], refs: list[str]) -> float:
    from faqtune.metrics import answer_accuracy

    return answer_accuracy(texts, refs, refs)


# --- workers (each in its own process) ---------------------------------------------------------------------

def worker_reference(out: Path, steps: int) -> None:
    import torch
    from reference_recipe import guide_prompt, load_reference_model, train_reference

    from faqtune.data import load_faq
    from faqtune.models import load_tokenizer, resolve_base

    entries = load_faq(SHARED_FAQ).entries[:LIMIT]
    base = resolve_base("smollm2-135m")
    tok = load_tokenizer(base)
    model = load_reference_model(base)
    bits = bits_per_param(model)  # as stored after loading (bitsandbytes' CPU inference kernel repacks later)
    rows = [tok(guide_prompt(e.question, e.answer))["input_ids"] for e in entries]
    with tempfile.TemporaryDirectory() as tmp:
        res = train_reference(model, tok, None, tmp, max_steps=steps, token_rows=rows)
    training_peak = TrainingPeak.hwm_gib()
    base_linear, lora = linear_params(model)
    mean_len = statistics.fmean(map(len, rows))
    flops = train_flops(model.config, base_linear, lora, res.real_tokens, res.real_tokens, mean_len)
    model.eval()
    texts, stopped = [], 0
    tok.padding_side = "left"
    prompts = [f"<human>: {e.question}\n<assistant>:" for e in entries]
    with torch.inference_mode():
        for i in range(0, len(prompts), 16):
            batch = tok(prompts[i:i + 16], return_tensors="pt", padding=True)
            gen = model.generate(**batch, max_new_tokens=128, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.eos_token_id)[:, batch["input_ids"].shape[1]:]
            for row in gen.tolist():
                stop = row.index(tok.eos_token_id) if tok.eos_token_id in row else None
                stopped += stop is not None
                texts.append(tok.decode(row[:stop], skip_special_tokens=True).split("<human>:")[0].strip())
    out.write_text(json.dumps({
        "train_seconds": res.seconds, "steps": res.steps, "real_tokens": res.real_tokens, "final_loss": res.final_loss,
        "train_flops": flops, "answer_accuracy": score(texts, [e.answer for e in entries]),
        "stop_rate": stopped / len(entries), "bits_per_param": bits, "training_peak_rss_gib": training_peak,
    }))


class Probe(TrainerCallback):
    """Answer accuracy at the SCHEDULE steps; the time spent here is excluded from training time. `grounded`
    makes the run's grounded answerer (None: plain), `curve` collects the points, `rows` the examples as
    trained (grounded prompts included)."""

    def __init__(self, cfg, questions: list[str], refs: list[str], grounded, peak: TrainingPeak):
        self.cfg, self.questions, self.refs, self.grounded, self.peak = cfg, questions, refs, grounded, peak
        self.curve: list[dict] = []
        self.rows: list = []
        self.paused = 0.0
        self.start = None

    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None,
                       **kw):
        self.rows = list(train_dataloader.dataset) if train_dataloader is not None else []
        self.start = time.perf_counter()
        self.steps = {max(1, round(f * state.max_steps)) for f in SCHEDULE}
        self.probe(state, model, processing_class)  # step 0: the base model (grounded: with the entries)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kw):
        if state.global_step in self.steps:
            self.probe(state, model, processing_class)

    def probe(self, state, model, processing_class):
        self.peak.note()
        t = time.perf_counter()
        was_training = model.training
        model.eval()
        bot = Answerer(model, processing_class, self.cfg.generation, self.cfg.data.system_prompt)
        if self.grounded is not None:
            bot = self.grounded(model, processing_class)
        texts = [a.text for a in bot.ask_many(self.questions, batch_size=16)]
        model.train(was_training)
        self.curve.append({"step": state.global_step, "train_seconds": t - self.start - self.paused,
                           "answer_accuracy": score(texts, self.refs)})
        del bot
        self.paused += time.perf_counter() - t
        self.peak.reset()


def search_run_index(run_root: str, questions: list[str], k: int, hybrid: bool):
    """The run's threshold and each question's top-k entries (called in a child process, as training indexes)."""
    from faqtune.grounding import open_run_index

    index = open_run_index(run_root)
    return index.threshold, dict(zip(questions, index.search_many(questions, k=k, hybrid=hybrid), strict=True))


class RecordedIndex:
    """The run's index as the probes query it, searched once in a child process before the first probe: the
    embedder, LanceDB and their imports stay out of the training process, as in a `faqtune train` without
    probes, so that the training peak measured is training's."""

    def __init__(self, threshold: float, hits: dict):
        self.threshold, self.hits = threshold, hits

    def search_many(self, queries: list[str], k: int, hybrid: bool = False):
        return [self.hits[q][:k] for q in queries]


def worker_faqtune(out: Path, sets: list[str]) -> None:
    import faqtune.train as ft
    from faqtune.config import load_config
    from faqtune.data import load_faq
    from faqtune.grounding import GroundedAnswerer, make_answerer

    entries = load_faq(SHARED_FAQ).entries
    scored = entries[:LIMIT]
    questions, refs = [e.question for e in scored], [e.answer for e in scored]

    overrides = {"data.path": str(SHARED_FAQ), "data.eval_fraction": "0", "train.eval_steps": "0",
                 "output_dir": str(out.parent / "faqtune-run")}
    overrides.update(s.split("=", 1) for s in sets)
    cfg = load_config(None, overrides)
    grounded, recorded = None, []
    if cfg.grounding.mode == "retrieval":
        def grounded(model, tok):
            if not recorded:  # the run's index exists once training has begun
                g = cfg.grounding
                recorded.append(RecordedIndex(*in_fresh_process(search_run_index, cfg.output_dir, questions,
                                                                max(g.top_k, g.related + 1), g.hybrid)))
            return GroundedAnswerer(model, tok, cfg.generation, cfg.data.system_prompt, recorded[0], cfg)

    peak = TrainingPeak()
    probe = Probe(cfg, questions, refs, grounded, peak)
    summary = ft.train(cfg, callbacks=(probe,))
    peak.note()
    from faqtune.loading import load_for_inference

    model, tok, cfg = load_for_inference(cfg.output_dir)
    bits = bits_per_param(model)  # as stored after loading (bitsandbytes' CPU inference kernel repacks later)
    compute_dtype = str(next(m for m in model.modules() if hasattr(m, "compute_dtype")).compute_dtype)
    base_linear, lora = linear_params(model)  # of the model as trained
    if cfg.generation.merged != "none":  # answer as `faqtune ask` does (merged in memory where it pays)
        model, tok, cfg = load_for_inference(cfg.output_dir, merged=cfg.generation.merged)
    bot = make_answerer(cfg.output_dir, model, tok, cfg)
    bot.ask(questions[0])
    latencies, answers = [], []
    for q in questions[:LATENCY_QUESTIONS]:  # one at a time: what a user waits for one answer
        t = time.perf_counter()
        answers.append(bot.ask(q)[0])
        latencies.append(time.perf_counter() - t)
    t = time.perf_counter()
    batched = bot.ask_many(questions, batch_size=16)  # every question: accuracy, stop rate, batched throughput
    batched_s = time.perf_counter() - t
    tokens = summary["tokens_per_second"] * summary["train_seconds"]
    rows = probe.rows
    mean_len = statistics.fmean(len(r["input_ids"]) for r in rows)
    answer_share = sum(sum(x != -100 for x in r["labels"]) for r in rows) / sum(len(r["labels"]) for r in rows)
    flops = train_flops(model.config, base_linear, lora, int(tokens), int(tokens * answer_share), mean_len)
    out.write_text(json.dumps({
        # training time without the probes' answering (the summary's wall clock includes it)
        "train_seconds": summary["train_seconds"] - probe.paused,
        "wall_seconds_with_probes": summary["train_seconds"], "setup_seconds": summary.get("grounding_seconds", 0.0),
        "steps": summary["steps"], "real_tokens": int(tokens),
        "final_loss": summary["final_loss"], "train_flops": flops, "curve": probe.curve,
        "answer_accuracy": score([a.text for a in batched], refs),
        "stop_rate": sum(a.stopped for a in batched) / len(batched),
        "answer_p50_s": statistics.median(latencies),
        "latency_mean_answer_tokens": statistics.fmean(a.new_tokens for a in answers),
        "mean_answer_tokens": statistics.fmean(a.new_tokens for a in batched),
        "batched_answers_per_s": len(questions) / batched_s,
        "batched_tokens_per_s": sum(a.new_tokens for a in batched) / batched_s,
        "bits_per_param": bits, "training_peak_rss_gib": peak.gib, "compute_dtype": compute_dtype,
        # the largest child process: the index built (and searched for the probes) beside training
        "child_peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
        "answered_with": str(next(model.parameters()).dtype) + (" merged" if "Peft" not in type(model).__name__ else ""),
        "grounding": cfg.grounding.mode, "mean_example_tokens": mean_len,
    }))


def run_worker(kind: str, extra: list[str]) -> tuple[dict, float]:
    """Run a worker in a fresh process; returns its JSON and its peak RSS in GiB."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--out", str(out), *extra])
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"{kind} worker failed ({status})")
        return json.loads(out.read_text()), usage.ru_maxrss / 2**20


def scale_figures() -> dict:
    """Per-example training cost, 79 pairs vs the 1,499-row bank FAQ; reading a 100,000-row JSONL."""

    from faqtune.data import load_faq

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        with path.open("w") as f:
            for i in range(100_000):
                f.write(json.dumps({"question": f"Question number {i} about order {i * 7}?",
                                    "answer": f"Answer {i}: see the help page, section {i % 97}."}) + "\n")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        data = load_faq(path)
        out["jsonl_100k_read_seconds"] = time.perf_counter() - t
        out["jsonl_100k_entries"] = len(data)
        out["jsonl_100k_rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    for name, faq in (("shared_79", SHARED_FAQ), ("bank_1499", BANK_FAQ)):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "faqtune", "train", "--data", str(faq), "--output", f"{tmp}/run",
                   "--train.max_steps", "12", "--train.eval_steps", "0", "--data.eval_fraction", "0",
                   "--grounding.mode", "none"]
            subprocess.run(cmd, check=True, capture_output=True)
            s = json.loads(Path(f"{tmp}/run/summary.json").read_text())
            out[f"{name}_seconds_per_example"] = s["train_seconds"] / (12 * 4)
            out[f"{name}_tokens_per_second"] = s["tokens_per_second"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["reference", "faqtune"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="faqtune override")
    p.add_argument("--reference-steps", type=int, default=80)
    p.add_argument("--scale", action="store_true", help="also measure data scaling")
    p.add_argument("--suffix", default="", help="appended to the result's name: results/<date><suffix>.json")
    args = p.parse_args()
    if args.worker == "reference":
        worker_reference(Path(args.out), args.reference_steps)
        return 0
    if args.worker == "faqtune":
        worker_faqtune(Path(args.out), args.set)
        return 0

    peak = {"fp32": matmul_peak("float32"), "bf16": matmul_peak("bfloat16")}
    ref, ref_rss = run_worker("reference", ["--reference-steps", str(args.reference_steps)])
    ours, our_rss = run_worker("faqtune", [x for s in args.set for x in ("--set", s)])
    reached = next((c for c in ours["curve"] if c["answer_accuracy"] >= ref["answer_accuracy"]), None)
    # time-to-quality counts faqtune's setup (grounding's index) with its training seconds
    ttq = reached["train_seconds"] + ours["setup_seconds"] if reached else None
    fp32 = peak["fp32"]
    result = {
        "date": str(datetime.date.today()),
        "commit": commit(),
        "machine": machine(),  # CPU model, bf16 flags, threads, matmul rates (this run's peak is below too)
        "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()},
        "reference": {**ref, "peak_rss_gib": ref_rss, "flops_per_s": ref["train_flops"] / ref["train_seconds"]},
        "faqtune": {**ours, "peak_rss_gib": our_rss, "flops_per_s": ours["train_flops"] / ours["train_seconds"]},
        "time_to_quality_s": ttq,
        "time_to_quality_training_only_s": reached["train_seconds"] if reached else None,
        "time_to_quality_speedup": ref["train_seconds"] / ttq if ttq else None,
        "throughput_share_of_peak": ours["train_flops"] / ours["train_seconds"] / fp32,
        "reference_share_of_peak": ref["train_flops"] / ref["train_seconds"] / fp32,
        # training's peak (the probes' and the final answering's left out); whole processes beside it
        "peak_rss_ratio": ours["training_peak_rss_gib"] / ref["training_peak_rss_gib"],
        "process_peak_rss_ratio": our_rss / ref_rss,
        "bits_per_param": ours["bits_per_param"],
        "answer_p50_s": ours["answer_p50_s"],
        "faqtune_overrides": args.set,
    }
    if args.scale:
        result["scale"] = scale_figures()
    print(f"\nmatmul peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"{'':10s} {'train s':>8s} {'tok/s':>7s} {'GFLOP/s':>8s} {'% fp32 peak':>11s} {'train RSS':>9s} "
          f"{'accuracy':>9s} {'stop':>5s}")
    for name in ("reference", "faqtune"):
        r = result[name]
        print(f"{name:10s} {r['train_seconds']:8.1f} {r['real_tokens'] / r['train_seconds']:7.1f} "
              f"{r['flops_per_s'] / 1e9:8.1f} {100 * r['flops_per_s'] / fp32:10.1f}% {r['training_peak_rss_gib']:8.2f}G "
              f"{r['answer_accuracy']:9.3f} {r['stop_rate']:5.2f}")
    print("faqtune accuracy along the way: " + ", ".join(
        f"step {c['step']} ({c['train_seconds']:.0f}s) {c['answer_accuracy']:.3f}" for c in ours["curve"]))
    print(f"time to the reference's final accuracy ({ref['answer_accuracy']:.3f}): "
          f"{ttq if ttq is None else round(ttq, 1)} s (setup {ours['setup_seconds']:.1f} s included) -> speedup "
          f"{result['time_to_quality_speedup']}")
    print(f"training peak RSS ratio {result['peak_rss_ratio']:.2f} (whole processes "
          f"{result['process_peak_rss_ratio']:.2f}; faqtune's largest child, the index: "
          f"{ours.get('child_peak_rss_gib', 0):.2f} GB); bits/param {result['bits_per_param']:.3f} "
          f"(reference {ref['bits_per_param']:.3f}); answer p50 {ours['answer_p50_s']:.2f}s; batched "
          f"{ours['batched_tokens_per_s']:.0f} tok/s")
    if args.scale:
        print("scale:", json.dumps(result["scale"], indent=1))
    write_result(result, args.suffix)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
