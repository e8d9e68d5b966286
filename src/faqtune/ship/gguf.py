"""GGUF export: a merged Llama-architecture model + its byte-level BPE tokenizer + the training chat
template, written with the `gguf` package's GGUFWriter, plus an Ollama Modelfile; and a round-trip check.

Layout follows llama.cpp's convert_hf_to_gguf.py for LLAMA: tensor names from gguf's TensorNameMap,
q_proj/k_proj rows permuted for llama.cpp's rope (transformers' GGUF loader reverses it:
`LlamaTensorProcessor._reverse_permute_weights`), 1-D tensors kept in F32, no `output.weight` when the
embeddings are tied. The tokenizer is written as `gpt2` (byte-level BPE): tokens, merges, token types
(normal / control for special added tokens / user-defined for other added tokens), special ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from faqtune.data import load_faq
from faqtune.errors import FaqtuneError, ModelError
from faqtune.loading import merge_adapter, open_run
from faqtune.prompting import encode_conversation, encode_prompt, render, with_system
from faqtune.run import RunDir

OUTTYPES = ("f16", "q8_0", "f32")


# ---- model ------------------------------------------------------------------------------------------

def check_llama(config) -> None:
    """Refuse what this writer does not reproduce, rather than write a file that loads wrong."""
    problems = []
    if config.model_type != "llama":
        problems.append(f"architecture '{config.model_type}' (only llama is written; use llama.cpp's "
                        "convert_hf_to_gguf.py on the merged folder for others)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling '{rope.get('rope_type')}'")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("bias terms in attention or MLP")
    if problems:
        raise ModelError("cannot export this model to GGUF: " + "; ".join(problems))


def rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k: (heads, 2, head_dim/2, in) -> (heads, head_dim/2, 2, in).

    llama.cpp applies rope to adjacent pairs, transformers to the two halves of each head.
    """
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) for every tensor of a LlamaForCausalLM, in llama.cpp's layout."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    out = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd
        stem, _, suffix = hf_name.rpartition(".")
        name = names.get_name(stem)
        if name is None:
            raise ModelError(f"cannot map tensor {hf_name} to a GGUF name")
        data = tensor.detach().float().cpu().numpy()
        if stem.endswith("self_attn.q_proj"):
            data = rope_permute(data, cfg.num_attention_heads)
        elif stem.endswith("self_attn.k_proj"):
            data = rope_permute(data, cfg.num_key_value_heads)
        out.append((f"{name}.{suffix}", data))
    return out


def _encode_tensor(data: np.ndarray, outtype: str):
    """(array, raw dtype or None): 1-D tensors stay F32 (as llama.cpp does); Q8_0 needs rows of 32s."""
    import gguf

    if data.ndim == 1 or outtype == "f32":
        return data.astype(np.float32), None
    if outtype == "q8_0" and data.shape[-1] % 32 == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data, q8), q8
    return data.astype(np.float16), None


# ---- tokenizer --------------------------------------------------------------------------------------

def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre_tokenizer (how text is split before BPE)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's (llama.cpp's name; "gpt2" there is an unknown one)
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # llama.cpp: each digit alone, then GPT-2's regex (HF SmolLM2's tokenizer.json)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == split:
                return name
    raise ModelError(f"cannot tell llama.cpp how this tokenizer splits text (pre_tokenizer {json.dumps(pre)[:200]}); "
                     "supported: GPT-2 byte-level, SmolLM2 digits, and the llama-3 / qwen2 splits")


@dataclass
class GgufVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    add_bos: bool


def gguf_vocab(tokenizer, vocab_size: int) -> GgufVocab:
    """The byte-level BPE vocabulary of a fast tokenizer, padded with unused tokens to the model's rows."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ModelError("only byte-level BPE tokenizers (GPT-2 style) are exported to GGUF; this one is "
                         f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''} "
                         "(use llama.cpp's convert_hf_to_gguf.py on the merged folder)")
    pieces = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        pieces[added["id"]] = (added["content"], kind)
    size = max(vocab_size, max(pieces) + 1)
    tokens = [pieces.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))[0] for i in range(size)]
    types = [int(pieces.get(i, (None, gguf.TokenType.UNUSED))[1]) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    return GgufVocab(tokens, types, merges, pre_tokenizer_name(spec.get("pre_tokenizer")), add_bos)


# ---- writing ----------------------------------------------------------------------------------------

def check_outtype(outtype: str) -> None:
    """The one check of `--outtype` (export_run makes it before the merge, write_gguf for direct callers)."""
    if outtype not in OUTTYPES:
        raise ModelError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")


def write_gguf(model, tokenizer, path: str | Path, outtype: str = "f16", name: str = "faqtune") -> Path:
    """Write `model` (a merged LlamaForCausalLM) + `tokenizer` (its chat template included) as one GGUF."""
    import gguf

    check_outtype(outtype)
    cfg = model.config
    check_llama(cfg)
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(vocab.tokens))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_file_type(file_type)
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    for tensor_name, data in gguf_tensors(model):
        array, raw_dtype = _encode_tensor(data, outtype)
        writer.add_tensor(tensor_name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- Ollama -----------------------------------------------------------------------------------------

_S, _U, _A = "\x00SYSTEM\x00", "\x00USER\x00", "\x00ANSWER\x00"


def _tail(text: str, after: str) -> str:
    return text[text.rindex(after) + len(after):]


def template_parts(tokenizer) -> dict[str, str] | None:
    """Per-role text around each message, derived by rendering the chat template with sentinels.

    Returns prefix/suffix of system, user and assistant turns, the generation prompt and the default
    system prompt the template inserts (if any); None when the template is not a plain per-turn wrapper.
    """
    def r(msgs, gen):
        return render(tokenizer, [{"role": role, "content": c} for role, c in msgs], add_generation_prompt=gen)

    try:
        sys_only = r([("system", _S)], False)
        su = r([("system", _S), ("user", _U)], False)
        sua = r([("system", _S), ("user", _U), ("assistant", _A)], False)
        sug = r([("system", _S), ("user", _U)], True)
        u = r([("user", _U)], False)
    except Exception:  # a template that refuses these shapes (e.g. requires alternation) gets no TEMPLATE
        return None
    parts = {"system_prefix": sys_only[: sys_only.index(_S)], "system_suffix": _tail(sys_only, _S)}
    between = su[su.index(_S) + len(_S): su.index(_U)]
    if not between.startswith(parts["system_suffix"]):
        return None
    parts["user_prefix"] = between[len(parts["system_suffix"]):]
    parts["user_suffix"] = _tail(su, _U)
    after_user = sua[sua.index(_U) + len(_U): sua.index(_A)]
    gen = _tail(sug, _U)
    if not after_user.startswith(parts["user_suffix"]) or not gen.startswith(parts["user_suffix"]):
        return None
    parts["assistant_prefix"] = after_user[len(parts["user_suffix"]):]
    parts["assistant_suffix"] = _tail(sua, _A)
    parts["generation_prompt"] = gen[len(parts["user_suffix"]):]
    head = u[: u.index(_U)]
    parts["default_system"] = ""
    if head != parts["user_prefix"]:  # the template inserts a system turn of its own
        inner = head[len(parts["system_prefix"]):]
        tail = parts["system_suffix"] + parts["user_prefix"]
        if not head.startswith(parts["system_prefix"]) or not inner.endswith(tail):
            return None
        parts["default_system"] = inner[: len(inner) - len(tail)]
    return parts


def render_like_ollama(parts: dict[str, str], messages: list[dict[str, str]]) -> str:
    """What the Modelfile's TEMPLATE renders for `messages` (used to check it against the Jinja template)."""
    text = "".join(parts[f"{m['role']}_prefix"] + m["content"] + parts[f"{m['role']}_suffix"] for m in messages)
    return text + parts["generation_prompt"]


def _go_literal(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')


def ollama_modelfile(tokenizer, gguf_name: str, system_prompt: str | None, generation) -> str:
    """An Ollama Modelfile: FROM the GGUF, the training chat template as a Go TEMPLATE, stops, defaults."""
    parts = template_parts(tokenizer)
    lines = ["# ollama create faqbot -f Modelfile && ollama run faqbot",
             f"FROM ./{gguf_name}"]
    system = system_prompt or (parts or {}).get("default_system", "")
    check = [{"role": "system", "content": system or "S"}, {"role": "user", "content": "Q1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    if parts is not None and render_like_ollama(parts, check) == render(tokenizer, check, True):
        p = {k: _go_literal(v) for k, v in parts.items()}
        body = ("{{- range .Messages }}"
                f'{{{{ if eq .Role "system" }}}}{p["system_prefix"]}{{{{ .Content }}}}{p["system_suffix"]}'
                f'{{{{ else if eq .Role "user" }}}}{p["user_prefix"]}{{{{ .Content }}}}{p["user_suffix"]}'
                f'{{{{ else }}}}{p["assistant_prefix"]}{{{{ .Content }}}}{p["assistant_suffix"]}'
                "{{ end }}{{ end }}" + p["generation_prompt"])
        lines.append(f'TEMPLATE """{body}"""')
    else:
        lines.append("# no TEMPLATE: the chat template is not a plain per-turn wrapper; Ollama falls back to the")
        lines.append("# tokenizer.chat_template stored in the GGUF")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    stops = [tokenizer.eos_token] + ([parts["user_prefix"].strip()] if parts and parts["user_prefix"].strip() else [])
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(s for s in stops if s)]
    lines.append(f"PARAMETER temperature {generation.temperature}")
    lines.append(f"PARAMETER num_predict {generation.max_new_tokens}")
    if generation.repetition_penalty != 1.0:
        lines.append(f"PARAMETER repeat_penalty {generation.repetition_penalty}")
    return "\n".join(lines) + "\n"


# ---- round trip -------------------------------------------------------------------------------------

@torch.inference_mode()
def verify_gguf(path: str | Path, model, tokenizer, prompts: list[list[dict[str, str]]],
                conversation: list[dict[str, str]]) -> dict[str, Any]:
    """Load the GGUF back with transformers; compare logits with `model` and template token ids with
    `tokenizer` (the training tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    loaded_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    reference = model.float()
    diffs, same, positions = [], 0, 0
    for messages in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, messages)])
        a = reference(input_ids=ids, use_cache=False).logits
        b = loaded(input_ids=ids, use_cache=False).logits
        diffs.append(float((a - b).abs().max()))
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += ids.shape[1]
    train_ids = encode_conversation(tokenizer, conversation, 10**6).input_ids
    gguf_ids = encode_conversation(loaded_tok, conversation, 10**6).input_ids
    return {
        "prompts": len(prompts),
        "max_abs_logit_diff": max(diffs),
        "top1_agreement": same / max(1, positions),  # share of prompt positions with the same next token
        "logit_scale": float(reference(input_ids=ids, use_cache=False).logits.abs().max()),
        "template_ids_equal": train_ids == gguf_ids,
        "template_tokens": len(train_ids),
        "chat_template_equal": loaded_tok.chat_template == tokenizer.chat_template,
    }


# ---- the command ------------------------------------------------------------------------------------

def export_run(run_dir: str | Path, out_path: str | Path, outtype: str = "f16", verify: bool = True,
               trust_remote_code: bool = False, force: bool = False) -> dict[str, Any]:
    """Merge the run (into the dequantized NF4 weights, the faithful merge), write OUT.gguf and a Modelfile
    next to it, and (verify) load the GGUF back with transformers to compare logits and template ids.

    An existing OUT.gguf or Modelfile is replaced only with `force` (a hand-edited Modelfile is the user's
    work); the GGUF is written beside OUT.gguf and renamed into place, so a write cut short leaves it as it was."""
    check_outtype(outtype)  # before minutes of merging
    out = Path(out_path)
    if out.suffix != ".gguf":
        raise ModelError(f"{out}: the output file must end in .gguf")
    modelfile = out.parent / "Modelfile"
    existing = [str(p) for p in (out, modelfile) if p.exists()]
    if existing and not force:
        raise FaqtuneError(f"{' and '.join(existing)}: already there; pass --force to replace "
                           f"{'them' if len(existing) > 1 else 'it'} (export-gguf writes {out.name} and a "
                           "Modelfile next to it)")
    opened = open_run(run_dir, trust_remote_code=trust_remote_code)
    run, cfg = RunDir(opened.root), opened.cfg
    tokenizer = opened.tokenizer()
    weights = "dequantized" if cfg.quantization.mode != "none" else "original"
    model = merge_adapter(run.root, weights, "fp32", cfg)
    check_llama(model.config)
    partial = out.with_name(f".{out.name}.partial")
    try:
        write_gguf(model, tokenizer, partial, outtype, name=run.root.name)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    modelfile.write_text(ollama_modelfile(tokenizer, out.name, cfg.data.system_prompt, cfg.generation),
                         encoding="utf-8")
    result: dict[str, Any] = {"gguf": str(out), "modelfile": str(modelfile), "outtype": outtype,
                              "base_weights": weights, "megabytes": out.stat().st_size / 2**20}
    if verify:
        entries = []
        for split in (run.eval_split, run.train_split):
            if split.exists() and split.stat().st_size:
                entries += load_faq(split).entries
        questions = [e.question for e in entries[:3]] or ["How do I return an item?"]
        prompts = [with_system([{"role": "user", "content": q}], cfg.data.system_prompt) for q in questions]
        conversation = with_system(entries[0].as_messages() if entries else
                                   [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": "Yes."}],
                                   cfg.data.system_prompt)
        result["verify"] = verify_gguf(out, model, tokenizer, prompts, conversation)
    return result


def format_export(result: dict[str, Any]) -> str:
    lines = [f"wrote {result['gguf']} ({result['outtype']}, {result['megabytes']:.1f} MB; merged into the "
             f"{result['base_weights']} base weights) and {result['modelfile']}"]
    v = result.get("verify")
    if v:
        lines.append(f"round trip (transformers loads the GGUF back): max |logit diff| {v['max_abs_logit_diff']:.2e} "
                     f"over {v['prompts']} prompts (logits up to {v['logit_scale']:.1f}), same next token at "
                     f"{100 * v['top1_agreement']:.1f}% of positions; chat-template token ids "
                     f"{'identical' if v['template_ids_equal'] else 'DIFFERENT'} ({v['template_tokens']} tokens); "
                     f"chat template {'identical' if v['chat_template_equal'] else 'DIFFERENT'}")
    return "\n".join(lines)
