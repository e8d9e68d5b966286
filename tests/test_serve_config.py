"""`faqtune serve-config`: the engine launch recipes and their offline checks, and `load_upstream_models` on real
runs (their tokenizers, templates and indexes, without weights) answering through the fake engine."""

from __future__ import annotations

import json
import shutil

import pytest
from test_serve import runs  # noqa: F401 (the two tiny trained runs, a module fixture)
from test_serve_upstream import ANSWER, Engine, engine, mode  # noqa: F401

from faqtune.cli import main


def recipe(capsys, *args) -> str:
    assert main(["serve-config", *args]) == 0
    return capsys.readouterr().out


def test_vllm_recipe_names_every_adapter_and_sizes_the_rank(runs, capsys):  # noqa: F811
    alpha, second = runs
    out = recipe(capsys, str(alpha), f"second={second}", "--engine", "vllm", "--port", "8123")
    assert out.startswith("# vLLM: the base once (4bit nf4 as trained), 2 LoRA adapter(s), largest r 4")
    command = out.split("\n# then")[0]
    assert "vllm serve " in command and "--enable-lora" in command and "--max-loras 2" in command
    assert "--max-lora-rank 8" in command  # r 4 -> the smallest size vLLM accepts above it
    assert f"--lora-modules alpha={alpha.resolve() / 'adapter'}" in command
    assert f"--lora-modules second={second.resolve() / 'adapter'}" in command
    assert "--quantization bitsandbytes" in command and "--port 8123" in command
    assert f"faqtune serve alpha={alpha.resolve()} second={second.resolve()} --backend http://127.0.0.1:8123/v1" in out


def test_llamacpp_recipe_exports_a_gguf_per_run_and_names_them(runs, capsys, tmp_path):  # noqa: F811
    alpha, second = runs
    out = recipe(capsys, str(alpha), f"second={second}", "--engine", "llamacpp", "--gguf-dir", str(tmp_path))
    assert f"faqtune export-gguf {alpha.resolve()} {tmp_path / 'alpha.gguf'} --outtype f16" in out
    assert f"faqtune export-gguf {second.resolve()} {tmp_path / 'second.gguf'} --outtype f16" in out
    config = json.loads(out.split("<<'EOF'\n")[1].split("\nEOF")[0])
    assert [(m["model_alias"], m["model"]) for m in config["models"]] == \
        [("alpha", str(tmp_path / "alpha.gguf")), ("second", str(tmp_path / "second.gguf"))]
    assert config["port"] == 8001 and all(m["n_ctx"] == 512 for m in config["models"])
    assert f"python -m llama_cpp.server --config_file {tmp_path / 'llamacpp.json'}" in out
    assert not any("kv_overrides" in m for m in config["models"])  # the GGUFs need none: see test_export
    assert "--backend http://127.0.0.1:8001/v1" in out


def test_adapters_vllm_cannot_serve_are_refused_together(runs, capsys, tmp_path):  # noqa: F811
    alpha, _ = runs
    bad = tmp_path / "bad"
    shutil.copytree(alpha, bad, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    config_path = bad / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(modules_to_save=["lm_head"], r=1024, use_dora=True)
    config_path.write_text(json.dumps(config))
    assert main(["serve-config", str(bad), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "modules_to_save" in err and "DoRA" in err and "rank 1024" in err and "Traceback" not in err
    assert main(["serve-config", str(bad), "--engine", "llamacpp", "--gguf-dir", str(tmp_path)]) == 0  # merged


@pytest.mark.parametrize("text,fragment", [
    ('{"r": ', "Expecting value"), ("[1]", "not a JSON object"), ('{"r": "big"}', "invalid literal"),
])
def test_a_damaged_adapter_config_is_one_line_naming_it(runs, capsys, tmp_path, text, fragment):  # noqa: F811
    alpha, _ = runs
    bad = tmp_path / "bad"
    shutil.copytree(alpha, bad, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    (bad / "adapter" / "adapter_config.json").write_text(text)
    assert main(["serve-config", str(bad), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert f"{bad / 'adapter' / 'adapter_config.json'}: damaged or unreadable adapter config" in err
    assert fragment in err and "Traceback" not in err


def test_a_gguf_dir_that_is_a_file_is_refused(runs, capsys, tmp_path):  # noqa: F811
    alpha, _ = runs
    (tmp_path / "gguf").write_text("not a folder")
    assert main(["serve-config", str(alpha), "--engine", "llamacpp", "--gguf-dir", str(tmp_path / "gguf")]) == 2
    assert f"--gguf-dir {tmp_path / 'gguf'}: is a file, expected a directory" in capsys.readouterr().err


def test_runs_on_different_bases_are_refused(runs, capsys, tmp_path, tiny_base_no_template):  # noqa: F811
    alpha, _ = runs
    other = tmp_path / "other"
    shutil.copytree(alpha, other, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    cfg = (other / "config.yaml").read_text()
    assert f"base_model: {_base(alpha)}" in cfg
    (other / "config.yaml").write_text(cfg.replace(f"base_model: {_base(alpha)}", f"base_model: {tiny_base_no_template}"))
    assert main(["serve-config", str(alpha), f"other={other}", "--engine", "vllm"]) == 2
    assert "share the same base model" in capsys.readouterr().err


def _base(run):
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["base_model"]


def test_backend_flags_need_backend(runs, capsys):  # noqa: F811
    alpha, _ = runs
    assert main(["serve", str(alpha), "--backend-key", "k"]) == 2
    assert "need --backend URL" in capsys.readouterr().err
    assert main(["serve", str(alpha), "--backend", "localhost:8001"]) == 2
    assert "http:// or https://" in capsys.readouterr().err


def test_real_runs_answer_through_the_engine_with_their_index(runs, engine, mode):  # noqa: F811
    from test_serve import request
    from test_serve_upstream import KEY

    from faqtune.serve.app import create_app
    from faqtune.serve.http import ServerThread
    from faqtune.serve.upstream import Upstream, load_upstream_models

    alpha, second = runs
    models = load_upstream_models([str(alpha), f"second={second}"])
    assert set(models.names) == {"alpha", "second", _base(alpha).rstrip("/").split("/")[-1]}
    assert models.peft_model is None and models.entries["alpha"].index_watch is not None
    with ServerThread(create_app(models, api_key=KEY, backend=Upstream(engine, timeout=10))) as url:
        body = {"model": "second", "messages": [{"role": "user", "content": "How do I do thing number 3?"}]}
        status, _, got = request(url, body=body, key=KEY)
    assert status == 200, got
    sent = Engine.requests[-1]
    assert sent["model"] == "second" and "Thing 3 is done on page 3." in sent["prompt"]
    assert got["choices"][0]["faqtune_citation"]["id"] is not None
    assert got["choices"][0]["message"]["content"] in (ANSWER, "Thing 3 is done on page 3.")  # fallback may apply


def test_serve_config_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve-config", "--help"])
    assert e.value.code == 0 and "--engine" in capsys.readouterr().out


def test_the_served_context_is_the_bases_and_2048_where_its_config_does_not_say():
    from types import SimpleNamespace

    from faqtune.serve.jobs import context_length

    assert context_length(SimpleNamespace(max_position_embeddings=8192)) == 8192
    assert context_length(SimpleNamespace(max_position_embeddings=None)) == 2048
    assert context_length(SimpleNamespace()) == 2048
