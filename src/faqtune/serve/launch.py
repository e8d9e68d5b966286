"""`faqtune serve-config RUN... --engine vllm|llamacpp`: the command that starts an engine with the runs'
shared base and every run's adapter, for `faqtune serve RUN... --backend URL` to sit in front of.

Checked offline first, every problem reported at once: one shared base (and quantization), each adapter's
rank (vLLM's `--max-lora-rank` is the next size it accepts at or above the largest r), no trained
`modules_to_save` or DoRA (vLLM's LoRA serves neither), a chat template in every run's tokenizer (faqtune
renders the prompt itself and sends it to `/completions`, so the engine's own template is never used), and a
vocabulary the base can hold. llama.cpp gets one merged GGUF per run (`faqtune export-gguf`, served by
llama-cpp-python under the run's name as `model_alias`): faqtune writes no LoRA-adapter GGUF, so
llama.cpp's per-request adapter switching (`--lora`) is not used.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from faqtune.errors import ModelError
from faqtune.models import embedded_gguf
from faqtune.run import named_damage
from faqtune.serve.jobs import base_display_name, check_runs, context_length
from faqtune.ship.gguf import check_llama

ENGINES = ("vllm", "llamacpp")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


@dataclass
class ServedRun:
    name: str
    root: Path
    adapter_dir: Path
    r: int


@dataclass
class Recipe:
    base: str  # what the engine loads: a local folder (the embedded default's cache) or a hub id
    base_name: str  # the bare base's served name
    base_model: str  # as the runs' config.yaml names it (an alias, a hub id, a folder)
    runs: list[ServedRun]
    context: int
    quantization: str


def _adapter_rank(name: str, adapter_dir: Path, engine: str, problems: list[str]) -> int:
    path = adapter_dir / "adapter_config.json"
    with named_damage(path, "adapter config"):  # truncated JSON, not an object, a rank that is no number
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError(f"not a JSON object: {type(config).__name__}")
        ranks = [int(config.get("r") or 0), *map(int, dict(config.get("rank_pattern") or {}).values())]
    if min(ranks) < 1:
        problems.append(f"{name}: adapter_config.json has no LoRA rank r (is it a LoRA adapter?)")
    if engine == "vllm":
        if config.get("modules_to_save"):
            problems.append(f"{name}: the adapter trains modules_to_save {config['modules_to_save']}, which vLLM's "
                            "LoRA cannot serve; serve it in-process or with --engine llamacpp (merged)")
        if config.get("use_dora"):
            problems.append(f"{name}: a DoRA adapter; vLLM serves plain LoRA only")
        if max(ranks) > VLLM_LORA_RANKS[-1]:
            problems.append(f"{name}: LoRA rank {max(ranks)} is above vLLM's largest --max-lora-rank "
                            f"({VLLM_LORA_RANKS[-1]})")
    return max(ranks)


def _check_tokenizer(name: str, tokenizer, vocab_size: int, problems: list[str]) -> None:
    if not getattr(tokenizer, "chat_template", None):
        problems.append(f"{name}: its tokenizer has no chat template (the prompt faqtune sends the engine is "
                        "rendered with it); retrain with this faqtune, which saves one")
    if len(tokenizer) > vocab_size:
        problems.append(f"{name}: its tokenizer has {len(tokenizer)} tokens, more than the base's {vocab_size} "
                        "embeddings; an engine serving the shared base cannot generate the added ones")


def build_recipe(specs: list[str], engine: str, trust_remote_code: bool = False) -> Recipe:
    """Check the runs for `engine` (every problem at once) and gather what its command needs."""
    if engine not in ENGINES:
        raise ModelError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    runs, base = check_runs(specs, trust_remote_code)
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    problems: list[str] = []
    if engine == "llamacpp":
        try:
            check_llama(config)
        except ModelError as e:
            problems.append(str(e))
    served = []
    for name, run, _ in runs:
        r = _adapter_rank(name, run.adapter_dir, engine, problems)
        tokenizer = run.tokenizer()
        _check_tokenizer(name, tokenizer, int(config.vocab_size), problems)
        served.append(ServedRun(name, run.root.resolve(), run.adapter_dir.resolve(), r))
    if problems:
        raise ModelError(f"cannot serve these runs with {engine}:\n" + "\n".join(f"  - {p}" for p in problems))
    q = runs[0][2].quantization
    quantization = "none" if q.mode == "none" else f"{q.mode} {q.quant_type}" if q.mode == "4bit" else q.mode
    context = context_length(config)
    return Recipe(base, base_display_name(runs[0][2].base_model), runs[0][2].base_model, served, context,
                  quantization)


def _q(value: str | Path) -> str:
    return shlex.quote(str(value))


def faqtune_line(recipe: Recipe, url: str) -> str:
    runs = " ".join(_q(f"{r.name}={r.root}") for r in recipe.runs)
    return f"faqtune serve {runs} --backend {url}"


def vllm_recipe(recipe: Recipe, host: str, port: int) -> str:
    """vLLM: the base once, every adapter by name (`model` picks it per request), ranks and count sized."""
    rank = next(r for r in VLLM_LORA_RANKS if r >= max(run.r for run in recipe.runs))
    args = ["vllm", "serve", _q(recipe.base), "--served-model-name", _q(recipe.base_name), "--enable-lora",
            "--max-lora-rank", str(rank), "--max-loras", str(len(recipe.runs)), "--max-model-len",
            str(recipe.context), "--host", host, "--port", str(port)]
    if recipe.quantization.startswith("4bit"):  # the adapters were trained on the 4-bit base: serve that
        args += ["--quantization", "bitsandbytes"]
    lines = [f"# vLLM: the base once ({recipe.quantization} as trained), {len(recipe.runs)} LoRA adapter(s), "
             f"largest r {max(r.r for r in recipe.runs)}",
             " \\\n    ".join([" ".join(args), *(f"--lora-modules {_q(f'{r.name}={r.adapter_dir}')}"
                                                for r in recipe.runs)])]
    if not recipe.quantization.startswith("4bit"):
        lines.insert(1, f"# the runs were trained on a {recipe.quantization} base; vLLM serves it unquantized")
    lines += ["# then faqtune in front (retrieval, prompts, declines, citations):",
              faqtune_line(recipe, f"http://{host}:{port}/v1")]
    return "\n".join(lines) + "\n"


def llamacpp_config(recipe: Recipe, gguf_dir: Path, host: str, port: int, base_gguf: Path | None) -> dict:
    """llama-cpp-python's server config: one merged GGUF per run, each under the run's name."""
    models = [{"model": str(gguf_dir / f"{r.name}.gguf"), "model_alias": r.name, "n_ctx": recipe.context}
              for r in recipe.runs]
    if base_gguf is not None:
        models.append({"model": str(base_gguf), "model_alias": recipe.base_name, "n_ctx": recipe.context})
    # interrupt_requests: llama-cpp-python's default cuts the answer being streamed when another request
    # arrives; faqtune sends concurrent requests, which must wait their turn instead
    return {"host": host, "port": port, "interrupt_requests": False, "models": models}


def llamacpp_recipe(recipe: Recipe, gguf_dir: Path, host: str, port: int) -> str:
    base_gguf = embedded_gguf(recipe.base_model)
    config_path = gguf_dir / "llamacpp.json"
    config = json.dumps(llamacpp_config(recipe, gguf_dir, host, port, base_gguf), indent=1)
    lines = ["# llama.cpp: one merged GGUF per run (merged into the dequantized 4-bit base it was trained on; "
             "faqtune writes no LoRA-adapter GGUF); --force: rerunning the recipe replaces them, and the "
             "Modelfile each export writes next to its GGUF"]
    lines += [f"faqtune export-gguf {_q(r.root)} {_q(gguf_dir / (r.name + '.gguf'))} --outtype f16 --force"
              for r in recipe.runs]
    lines += ["# llama-cpp-python's server picks each run by `model` (its model_alias), loading one at a time "
              "(pip install 'llama-cpp-python[server]')",
              f"mkdir -p {_q(gguf_dir)} && cat > {_q(config_path)} <<'EOF'", config, "EOF",
              "# (OMP_WAIT_POLICY=PASSIVE: on CPU cores shared with other work, OpenMP's spinning stalls generation)",
              f"OMP_WAIT_POLICY=PASSIVE python -m llama_cpp.server --config_file {_q(config_path)}"]
    if base_gguf is None:
        lines.append(f"# the bare base {recipe.base_name} is not in the config (no GGUF of it here): requests "
                     "for it fail at the engine")
    first = recipe.runs[0]
    lines += ["# or, one run per process, llama.cpp's own server:",
              f"#   llama-server -m {_q(gguf_dir / (first.name + '.gguf'))} --alias {_q(first.name)} "
              f"-c {recipe.context} --host {host} --port {port}",
              "# then faqtune in front (retrieval, prompts, declines, citations):",
              faqtune_line(recipe, f"http://{host}:{port}/v1")]
    return "\n".join(lines) + "\n"


def serve_config(specs: list[str], engine: str, host: str = "127.0.0.1", port: int = 8001,
                 gguf_dir: str | Path = "gguf", trust_remote_code: bool = False) -> str:
    """The launch recipe for `engine`, as shell lines (comments say what each step is)."""
    if not 1 <= port <= 65535:
        raise ModelError(f"`--port` must be between 1 and 65535, got {port}")
    if engine == "llamacpp" and Path(gguf_dir).exists() and not Path(gguf_dir).is_dir():  # (one to create is fine)
        raise ModelError(f"--gguf-dir {gguf_dir}: is a file, expected a directory")
    recipe = build_recipe(specs, engine, trust_remote_code)
    if engine == "vllm":
        return vllm_recipe(recipe, host, port)
    return llamacpp_recipe(recipe, Path(gguf_dir).resolve(), host, port)
