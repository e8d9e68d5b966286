"""The command line: one table of commands; each parses, loads config, calls its stage.

This is the only module that turns errors into exit codes: a user's mistake prints one line, never a
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
import warnings
from collections.abc import Callable

from faqtune.errors import ConfigError, FaqtuneError
from faqtune.validation import finite_arg, positive_int_arg

# Generation options shared by ask, chat and demo: (flag, config key, type)
GEN_FLAGS = [
    ("--max-new-tokens", "max_new_tokens", int),
    ("--temperature", "temperature", float),
    ("--top-p", "top_p", float),
    ("--top-k", "top_k", int),
    ("--repetition-penalty", "repetition_penalty", float),
    ("--num-return-sequences", "num_return_sequences", int),
    ("--merged", "merged", str),
    ("--prompt-lookup", "prompt_lookup", int),
]
TRAIN_SHORTCUTS = {"data": "data.path", "base": "base_model", "output": "output_dir"}


def _quiet() -> None:
    """Keep stdout for answers: no library warnings or weight-loading bars unless FAQTUNE_VERBOSE=1."""
    if os.environ.get("FAQTUNE_VERBOSE"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # retry chatter; failures become one line
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """`--train.epochs 3`, `--lora.r=8`, `--epochs 3` (a unique leaf name) -> {"train.epochs": "3", ...}."""
    from faqtune.config import field_help, suggest

    keys = list(field_help())
    leaves: dict[str, list[str]] = {}
    for k in keys:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    out: dict[str, str] = {}
    problems: list[str] = []
    i = 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            problems.append(f"unexpected argument {tok!r} (settings look like --train.epochs 3)")
            i += 1
            continue
        name, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                problems.append(f"--{name} needs a value")
                i += 1
                continue
            value = extra[i + 1]
            i += 1
        i += 1
        name = name.replace("-", "_")
        if name in keys:
            out[name] = value
        elif len(leaves.get(name, [])) == 1:
            out[leaves[name][0]] = value
        elif len(leaves.get(name, [])) > 1:
            problems.append(f"--{name} is ambiguous: say which, " + " or ".join(f"--{k}" for k in leaves[name]))
        else:
            close = difflib.get_close_matches(name, keys + list(leaves), n=1)
            hint = f" (did you mean --{close[0]}?)" if close else suggest(name).replace("`", "--", 1).replace("`", "")
            problems.append(f"unknown setting --{name}{hint}; see `faqtune train --help`")
    if problems:
        raise ConfigError(problems)
    return out


def _settings_epilog() -> str:
    from faqtune.config import field_help

    lines = ["settings (YAML keys; override any with --KEY VALUE, e.g. --train.epochs 3 or --lora.r 16):"]
    for key, (default, text) in field_help().items():
        lines.append(f"  {key:34s} {text} [default: {default}]")
    return "\n".join(lines)


def _add_gen_flags(p: argparse.ArgumentParser) -> None:
    for flag, key, typ in GEN_FLAGS:
        p.add_argument(flag, dest=f"gen_{key}", type=typ, default=None, help=f"generation.{key}")


def _gen_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {f"generation.{k}": getattr(args, f"gen_{k}") for _, k, _ in GEN_FLAGS
            if getattr(args, f"gen_{k}") is not None}


def _run_config(run_dir: str, args: argparse.Namespace):
    """The run's saved config with this command's generation flags applied (validated); remote code only with
    this command's --trust-remote-code, never from the saved settings."""
    from faqtune.loading import open_run

    return open_run(run_dir, _gen_overrides(args), getattr(args, "trust_remote_code", False)).cfg


def _check_text(text: str, what: str) -> str:
    """Command-line text that was not valid UTF-8 arrives with surrogate escapes: one line, not a traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FaqtuneError(f"{what} is not valid UTF-8 text (byte {e.start}): check the terminal's encoding") from None
    return text


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from faqtune.config import load_config
    from faqtune.run import RunDir, check_output, holds_run, load_saved_settings, run_lock
    from faqtune.train import train

    overrides: dict[str, object] = parse_overrides(extra)
    for flag, key in TRAIN_SHORTCUTS.items():
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if args.mix:
        overrides["data.mix"] = args.mix
    config_path, saved = args.config, None
    if args.resume and config_path is None and args.output and holds_run(RunDir(args.output)):
        saved = RunDir(args.output).config_path  # resume with the run's own settings
    if saved is not None:  # they cannot turn on remote code; only this command line can
        trust = overrides.pop("trust_remote_code", None)
        explicit = trust is not None and load_config(None, {"trust_remote_code": trust}).trust_remote_code
        cfg = load_saved_settings(saved, overrides, explicit)
    else:
        cfg = load_config(config_path, overrides)
    check_output(cfg.output_dir, "dir", "--output")
    with run_lock(cfg.output_dir):
        train(cfg, resume=args.resume)
    _end_process_group()
    return 0


def _end_process_group() -> None:
    """Under a launcher, leave the process group together: exiting with gloo's threads still running
    sometimes aborts a process after its work is done ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _answerer(run_dir: str, args: argparse.Namespace, base_only: bool = False):
    from faqtune.loading import load_for_inference, open_run

    run = open_run(run_dir, _gen_overrides(args), getattr(args, "trust_remote_code", False))  # Hub ids downloaded
    model, tokenizer, cfg = load_for_inference(run.root, base_only=base_only, cfg=run.cfg, merged=run.cfg.generation.merged)
    return _open_answerer(run.root, model, tokenizer, cfg, grounded=not args.no_grounding)


def _open_answerer(run_dir, model, tokenizer, cfg, grounded: bool):
    """make_answerer, with a damaged FAQ index (a missing LanceDB table, say) as one line naming it."""

    from faqtune.grounding import make_answerer
    from faqtune.run import RunDir, named_damage

    with named_damage(RunDir(run_dir).index_dir, "FAQ index"):
        return make_answerer(run_dir, model, tokenizer, cfg, grounded=grounded)


def cmd_ask(args: argparse.Namespace, extra: list[str]) -> int:
    from faqtune.grounding import cite, offer

    question = _check_text(args.question, "the question")
    if not question.strip():  # it was answered with the decline, exit 0
        raise FaqtuneError("the question is empty")
    bot = _answerer(args.run_dir, args, base_only=args.base_only)
    answers = bot.ask(question)
    print("\n\n".join(a.text for a in answers))
    sources = [line for a in answers for line in (cite(a), offer(a))]
    if any(sources):  # stderr: stdout stays the answer alone, for piping
        print("\n".join(dict.fromkeys(s for s in sources if s)), file=sys.stderr)
    return 0


def cmd_index(args: argparse.Namespace, extra: list[str]) -> int:
    from faqtune.config import load_config
    from faqtune.data import load_faq, load_faq_of_run
    from faqtune.grounding import build_index
    from faqtune.run import RunDir, check_output, holds_run, run_lock

    check_output(args.out, "dir", "--out", replaces="index")
    options = ("embedder", "embedder_epochs", "threshold", "question_weight", "joint_weight")
    overrides = {f"grounding.{k}": getattr(args, k) for k in options if getattr(args, k) is not None}
    run = RunDir(os.path.dirname(os.path.abspath(args.out)))
    inside_run = holds_run(run)  # RUN/index of a run: no training may write it meanwhile
    # a run's index is rebuilt with the run's grounding settings (its embedder, its tuning, a fixed threshold)
    cfg = run.load_config(overrides) if inside_run else load_config(None, overrides)
    faq = load_faq_of_run(args.faq, cfg.data) if inside_run else load_faq(args.faq)
    for note in faq.notes:  # duplicates dropped, questions asked twice: as train says them
        print(note, file=sys.stderr)
    with run_lock(run.root) if inside_run else contextlib.nullcontext():
        index = build_index(args.out, faq.entries, cfg)
    tuned = index.meta["embedder"] != index.embedder  # stored in the index, tuned on this FAQ's questions
    embedder = f"{cfg.grounding.embedder}, tuned on its questions" if tuned else index.embedder
    print(f"indexed {len(index)} entries of {args.faq} into {args.out} with {embedder} "
          f"(declines below similarity {index.threshold:.3f})")
    return 0


def cmd_chat(args: argparse.Namespace, extra: list[str]) -> int:
    from faqtune.chat import repl

    if (args.gen_num_return_sequences or 1) > 1:  # it was ignored: chat shows one answer a turn
        raise FaqtuneError("chat answers once a turn: --num-return-sequences is for `faqtune ask`")
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes reach repl as surrogates: it names their line
        sys.stdin.reconfigure(errors="surrogateescape")
    bot = _answerer(args.run_dir, args, base_only=args.base_only)
    return repl(bot, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from faqtune.demo import run_demo

    return run_demo(args.output, parse_overrides(extra), retrain=args.retrain)


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from faqtune.evaluate import build_eval_set, check_merged, evaluate_run, load_conversations, read_offtopic
    from faqtune.loading import load_for_inference
    from faqtune.report import summary, write_report
    from faqtune.run import RunDir, check_output

    check_merged(args.gen_merged)  # before anything loads; the model below is the 4-bit base + adapter
    run = RunDir(args.run_dir)
    cfg = _run_config(args.run_dir, args)
    out = check_output(args.out or run.eval_dir, "dir", "--out")  # before the evaluation, not after it
    eval_set = build_eval_set(run, cfg, args.questions, args.faq)
    if args.limit:
        eval_set.questions, eval_set.references = eval_set.questions[: args.limit], eval_set.references[: args.limit]
    offtopic = read_offtopic(args.offtopic)[: args.limit or None]
    conversations = load_conversations(run, cfg, args.conversations, args.faq) if args.conversations else None
    model, tokenizer, cfg = load_for_inference(run.root, cfg=cfg)
    bot = _open_answerer(run.root, model, tokenizer, cfg, grounded=not args.no_grounding)
    report = evaluate_run(model, tokenizer, cfg, eval_set, args.compare_base, offtopic, args.forgetting_threshold,
                          bot=bot, conversations=conversations)
    report.run_dir = str(run.root)
    md = write_report(report, out, run.metrics_path)
    print(summary(report))
    print(f"\nreport: {md}")
    if args.fail_on_forgetting and report.forgetting.flagged:
        print("error: forgetting beyond the threshold (see the report)", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from faqtune.serve.app import serve
    from faqtune.serve.http import ServeLimits

    names = ("queue_size", "max_batch_size", "max_body_bytes", "max_messages", "max_tokens_cap", "max_prompt_tokens",
             "header_timeout")
    limits = ServeLimits(**{k: getattr(args, k) for k in names if getattr(args, k) is not None})
    backend = None
    if args.backend is not None:
        from faqtune.serve.upstream import Upstream

        backend = Upstream(args.backend, args.backend_key or os.environ.get("FAQTUNE_BACKEND_KEY") or None,
                           **({"timeout": args.backend_timeout} if args.backend_timeout is not None else {}))
    elif args.backend_key is not None or args.backend_timeout is not None:
        raise FaqtuneError("--backend-key and --backend-timeout need --backend URL")
    return serve(args.run_dirs, host=args.host, port=args.port, api_key=args.api_key, limits=limits,
                 allowed_hosts=args.allowed_host or (), trust_remote_code=args.trust_remote_code, backend=backend)


def cmd_serve_config(args: argparse.Namespace, extra: list[str]) -> int:
    from faqtune.serve.launch import serve_config

    print(serve_config(args.run_dirs, args.engine, args.host, args.port, args.gguf_dir, args.trust_remote_code),
          end="")
    return 0


def cmd_merge(args: argparse.Namespace, extra: list[str]) -> int:
    from faqtune.run import check_output
    from faqtune.ship.merged import format_fidelity, merge_run

    check_output(args.out_dir, "dir", "OUT_DIR")
    report = merge_run(args.run_dir, args.out_dir, args.dtype, args.base_weights, args.limit or 0,
                       check=not args.no_check, trust_remote_code=args.trust_remote_code)
    print(format_fidelity(report))
    print(f"saved: {args.out_dir} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_push(args: argparse.Namespace, extra: list[str]) -> int:
    import tempfile

    from faqtune.run import RunDir, check_output
    from faqtune.ship.hub import push

    check_output(tempfile.gettempdir(), "dir", "staging folder")  # the upload is staged there
    if args.merged:
        check_output(RunDir(args.run_dir).merged_dir, "dir", "merged model folder")
    url = push(args.run_dir, args.repo_id, merged=args.merged, private=args.private,
               trust_remote_code=args.trust_remote_code)
    print(url)
    return 0


def cmd_export_gguf(args: argparse.Namespace, extra: list[str]) -> int:
    from faqtune.run import check_output
    from faqtune.ship.gguf import export_run, format_export

    check_output(args.out, "file", "OUT.gguf")
    print(format_export(export_run(args.run_dir, args.out, args.outtype, verify=not args.no_verify,
                                   trust_remote_code=args.trust_remote_code, force=args.force)))
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace, list[str]], int], str]] = {
    "train": (cmd_train, "fine-tune a LoRA adapter on an FAQ (QLoRA, 4-bit base)"),
    "ask": (cmd_ask, "answer one question with a trained run"),
    "chat": (cmd_chat, "interactive chat with a trained run (reads piped stdin too)"),
    "eval": (cmd_eval, "measure answers, stops, declines and forgetting, base vs tuned; write a report"),
    "index": (cmd_index, "build an FAQ's retrieval index (new entries need no retraining)"),
    "demo": (cmd_demo, "train on the bundled FAQ and compare base vs tuned answers"),
    "merge": (cmd_merge, "merge a run's adapter into its base: a standalone model, with a fidelity check"),
    "push": (cmd_push, "upload a run's adapter or merged model, with a model card, to the Hub"),
    "export-gguf": (cmd_export_gguf, "merge and write a GGUF (llama.cpp, Ollama) plus an Ollama Modelfile"),
    "serve": (cmd_serve, "serve runs over an OpenAI-compatible HTTP API, with a chat page"),
    "serve-config": (cmd_serve_config, "print the command that starts vLLM or llama.cpp for serve --backend"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faqtune", description="Turn an FAQ into a support chatbot (QLoRA).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in COMMANDS.items()}

    p = parsers["train"]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _settings_epilog()
    p.add_argument("--config", help="YAML config file (see examples/)")
    p.add_argument("--data", help="FAQ file: JSON, JSONL or CSV (data.path)")
    p.add_argument("--base", help="base model: alias, local folder or hub id (base_model)")
    p.add_argument("--output", help="run directory (output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--mix", action="append", metavar="FILE[:SHARE]",
                   help="mix general instruction data into training against forgetting ('general': the bundled "
                        "set), e.g. --mix general:0.2 (data.mix; repeatable)")

    for name in ("ask", "chat"):
        p = parsers[name]
        p.add_argument("run_dir", help="a run directory written by `faqtune train`, an adapter folder as `faqtune "
                                       "push` uploads it, or its Hub repo id (OWNER/NAME)")
        if name == "ask":
            p.add_argument("question")
        p.add_argument("--base-only", action="store_true", help="answer with the untuned base model")
        p.add_argument("--no-grounding", action="store_true",
                       help="answer without retrieved FAQ entries (a run trained with grounding expects them)")
        _add_gen_flags(p)

    p = parsers["index"]
    p.add_argument("faq", help="FAQ file: JSON, JSONL or CSV")
    p.add_argument("--out", required=True, help="index folder (a run's RUN_DIR/index to update the run)")
    p.add_argument("--embedder", help="sentence-embedding model: alias, id or folder [default: all-MiniLM-L6-v2]")
    p.add_argument("--embedder-epochs", type=int, help="epochs tuning the embedder first (0: as shipped) [default: 1]")
    p.add_argument("--threshold", type=float, help="decline below this similarity [default: calibrated]")
    p.add_argument("--question-weight", type=float, help="the question's share of an entry's score [default: 0.5]")
    p.add_argument("--joint-weight", type=float, help="of the rest, question and answer as one text [default: 0.6]")

    p = parsers["eval"]
    p.add_argument("run_dir", help="a run directory written by `faqtune train`")
    p.add_argument("--questions", help="questions to evaluate (any FAQ format, or .txt one a line) "
                                       "[default: the run's held-out split]")
    p.add_argument("--faq", help="FAQ that --questions without answers pair with, by 'id' or by order "
                                 "[default: the run's FAQ]")
    p.add_argument("--compare-base", action="store_true", help="also evaluate the untuned base, side by side")
    p.add_argument("--out", help="report folder [default: RUN_DIR/eval]")
    p.add_argument("--offtopic", help="off-topic questions: one a line, or JSON/JSONL/CSV records with a question field "
                   "[default: the bundled set]")
    p.add_argument("--forgetting-threshold", type=finite_arg, default=0.2,
                   help="flag forgetting when general-text perplexity rises more than this share [default: 0.2]")
    p.add_argument("--fail-on-forgetting", action="store_true", help="exit 1 when forgetting is flagged")
    p.add_argument("--limit", type=positive_int_arg, help="evaluate only the first N questions (quick checks)")
    p.add_argument("--no-grounding", action="store_true", help="evaluate without retrieved FAQ entries")
    p.add_argument("--conversations", help="JSONL of {\"turns\": [question, follow-up], \"id\": FAQ index of the "
                                           "follow-up's answer}: reports follow-up accuracy")
    _add_gen_flags(p)

    p = parsers["demo"]
    p.add_argument("--output", default="runs/demo", help="run directory of the demo [default: runs/demo]")
    p.add_argument("--retrain", action="store_true", help="train again even if the run already exists")

    p = parsers["merge"]
    p.add_argument("run_dir", help="a run directory written by `faqtune train`")
    p.add_argument("out_dir", help="folder for the merged model (must not exist or be empty)")
    p.add_argument("--dtype", metavar="{bf16,fp16,fp32}", default="bf16", help="saved dtype [default: bf16]")
    p.add_argument("--base-weights", metavar="{auto,dequantized,original}", default="auto",
                   help="merge into the NF4-dequantized weights the adapter was trained on, or the base's original "
                        "weights; auto measures both and keeps the more faithful [default: auto]")
    p.add_argument("--limit", type=positive_int_arg, help="measure on the first N held-out answers only")
    p.add_argument("--no-check", action="store_true", help="skip the fidelity measurement (auto: dequantized)")

    p = parsers["push"]
    p.add_argument("run_dir", help="a run directory written by `faqtune train`")
    p.add_argument("repo_id", help="OWNER/NAME on the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--merged", action="store_true", help="upload the merged model (RUN_DIR/merged, merged first "
                                                          "if missing) instead of the adapter")
    p.add_argument("--private", action="store_true", help="create the repository private")

    p = parsers["export-gguf"]
    p.add_argument("run_dir", help="a run directory written by `faqtune train`")
    p.add_argument("out", metavar="OUT.gguf", help="GGUF file to write; a Modelfile for Ollama goes next to it")
    p.add_argument("--outtype", metavar="{f16,q8_0,f32}", default="f16", help="weight type [default: f16]")
    p.add_argument("--no-verify", action="store_true", help="skip loading the GGUF back to compare logits")
    p.add_argument("--force", action="store_true", help="replace OUT.gguf and its Modelfile when they exist")

    p = parsers["serve"]
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="runs to serve, each by its folder's name or as NAME=RUN_DIR; all share one base model, "
                        "which is served too")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on [default: 127.0.0.1, this machine]")
    p.add_argument("--port", type=int, default=8000, help="[default: 8000]")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ [default: $FAQTUNE_API_KEY]")
    p.add_argument("--queue-size", type=int, help="requests that may wait for the model; more get 429 [default: 64]")
    p.add_argument("--max-batch-size", type=int, help="requests answered together in one batch [default: 8]")
    p.add_argument("--max-body-bytes", type=int, help="larger request bodies get 413 [default: 1000000]")
    p.add_argument("--max-messages", type=int, help="messages per request [default: 64]")
    p.add_argument("--max-tokens-cap", type=int, help="largest max_tokens a request may ask for [default: 1024]")
    p.add_argument("--max-prompt-tokens", type=int,
                   help="longest prompt in tokens (and at most the model's context); longer gets 400 "
                        "context_length_exceeded, counted before queueing [default: 2048]")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a Host name to answer besides localhost/127.0.0.1/[::1] (repeatable; against DNS "
                        "rebinding, other names get 400); bound to a non-loopback address, the only names answered")
    p.add_argument("--header-timeout", type=float,
                   help="seconds a client has to send a request head before it is disconnected [default: 10]")
    p.add_argument("--backend", metavar="URL",
                   help="generate on this OpenAI-compatible engine (vLLM, llama.cpp's server; e.g. "
                        "http://127.0.0.1:8001/v1) instead of in-process: faqtune retrieves, declines and cites, "
                        "the engine generates with each run's name as `model` (see `faqtune serve-config`)")
    p.add_argument("--backend-key", metavar="KEY",
                   help="the engine's API key, sent as 'Authorization: Bearer KEY' [default: $FAQTUNE_BACKEND_KEY]")
    p.add_argument("--backend-timeout", type=float, metavar="SECONDS",
                   help="seconds the engine may go without sending a byte before the request fails with 504 "
                        "[default: 300]")

    p = parsers["serve-config"]
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs to serve, as for `faqtune serve`")
    p.add_argument("--engine", metavar="{vllm,llamacpp}", required=True, help="the engine to start")
    p.add_argument("--host", default="127.0.0.1", help="the engine's address [default: 127.0.0.1]")
    p.add_argument("--port", type=int, default=8001, help="the engine's port [default: 8001]")
    p.add_argument("--gguf-dir", default="gguf", help="llamacpp: where the runs' GGUFs go [default: ./gguf]")
    for name in ("ask", "chat", "eval", "merge", "push", "export-gguf", "serve", "serve-config"):
        parsers[name].add_argument(
            "--trust-remote-code", action="store_true",
            help="let the base model run its own Python files (only for a model you trust; a run's or a "
                 "downloaded adapter's settings can never turn this on)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and args.command not in ("train", "demo"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet()
    try:
        return COMMANDS[args.command][0](args, extra)
    except FaqtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # e.g. 130/143 when training stopped on SIGINT/SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
