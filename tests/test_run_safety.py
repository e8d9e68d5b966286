"""A run's safety rails (issue 15): remote code only from the command line, one writer per run directory,
output paths checked before the work, damaged run files named in one line."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import one_error_line, thing_rows

from faqtune.cli import main
from faqtune.config import FaqtuneConfig
from faqtune.errors import FaqtuneError, ModelError
from faqtune.run import RUN_HEADER, RunDir


def _fake_run(root: Path, **settings) -> Path:
    """A run directory holding only its config.yaml (enough for every check made before loading a model)."""
    root.mkdir(parents=True)
    cfg = FaqtuneConfig(output_dir=str(root))
    for key, value in settings.items():
        setattr(cfg, key, value)
    cfg.grounding.mode = "none"
    cfg.quantization.compute_dtype = "fp32"
    cfg.save(root / "config.yaml", RUN_HEADER)
    return root


# ---- 1. trust_remote_code comes only from the command line -----------------------------------------

@pytest.fixture
def remote_code_base(tmp_path) -> tuple[Path, Path]:
    """A base model folder whose config maps to its own Python file; importing that file leaves a marker."""
    base, marker = tmp_path / "remote-code-base", tmp_path / "remote-code-ran"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "model_type": "faqtune_remote_test",
        "auto_map": {"AutoConfig": "remote_model.RemoteConfig", "AutoModelForCausalLM": "remote_model.RemoteModel"},
    }))
    (base / "remote_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                          "raise RuntimeError('remote code ran')\n")
    return base, marker


def _remote_code_run(tmp_path, base: Path, tiny_base: Path) -> Path:
    run = _fake_run(tmp_path / "run", base_model=str(base), trust_remote_code=True)
    (run / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_base / name, run / "tokenizer")
    return run


def test_a_runs_config_cannot_turn_on_remote_code(tmp_path, remote_code_base, tiny_base, capsys):
    base, marker = remote_code_base
    run = _remote_code_run(tmp_path, base, tiny_base)
    assert main(["ask", str(run), "hi?"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "the base model's own code ran"
    assert "trust_remote_code: true` ignored" in err and str(run / "config.yaml") in err
    assert "ships its own model code" in err


def test_trust_remote_code_flag_enables_it(tmp_path, remote_code_base, tiny_base):
    base, marker = remote_code_base
    run = _remote_code_run(tmp_path, base, tiny_base)
    with pytest.raises(Exception, match="remote code ran"):
        main(["ask", str(run), "hi?", "--trust-remote-code"])
    assert marker.exists()


def test_run_and_adapter_settings_ignore_trust_remote_code(tmp_path, capsys):
    from faqtune.loading import adapter_folder_config

    run = _fake_run(tmp_path / "run", trust_remote_code=True)
    assert RunDir(run).load_config().trust_remote_code is False
    assert "ignored" in capsys.readouterr().err
    assert RunDir(run).load_config(trust_remote_code=True).trust_remote_code is True

    folder = tmp_path / "adapter"  # as `faqtune push` uploads it (or `faqtune ask OWNER/NAME` downloads it)
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "some/base"}))
    (folder / "faqtune.yaml").write_text(yaml.safe_dump({"trust_remote_code": True}))
    assert adapter_folder_config(folder).trust_remote_code is False
    err = capsys.readouterr().err
    assert "faqtune.yaml" in err and "ignored" in err and len(err.strip().splitlines()) == 1
    assert adapter_folder_config(folder, trust_remote_code=True).trust_remote_code is True


def test_train_resume_takes_remote_code_only_from_its_command_line(tmp_path, remote_code_base, tiny_base, capsys):
    """The run's saved config says trust_remote_code and names a base shipping its own model code: a resume
    runs that code (when it loads the base model) only when its own command line asks."""
    from faqtune.checkpoints import REQUIRED, seal

    base, marker = remote_code_base
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a plain tokenizer: the model is what runs code
        shutil.copy(tiny_base / name, base)
    run = _fake_run(tmp_path / "run", base_model=str(base), trust_remote_code=True)
    checkpoint = run / "checkpoints" / "checkpoint-1"  # sealed, so the resume goes on to load the base
    checkpoint.mkdir(parents=True)
    for name in REQUIRED:
        (checkpoint / name).write_bytes(b"")
    seal(checkpoint)
    assert main(["train", "--output", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "the base model's own code ran"
    assert "trust_remote_code: true` ignored" in err and "ships its own model code" in err
    with pytest.raises(Exception, match="remote code ran"):
        main(["train", "--output", str(run), "--resume", "--trust_remote_code", "true"])
    assert marker.exists()


def test_push_never_writes_trust_remote_code(tmp_path):
    from faqtune.ship.hub import _write_shared_config

    cfg = FaqtuneConfig(trust_remote_code=True)
    _write_shared_config(cfg, tmp_path)
    assert "trust_remote_code" not in (tmp_path / "faqtune.yaml").read_text()


# ---- 2. one writer per run directory ----------------------------------------------------------------

def test_a_second_train_into_a_locked_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        assert main(["train", "--output", str(run), "--data", str(tmp_path / "no-such.json")]) == 2
        line = one_error_line(capsys)
        assert f"in use by process {holder.pid}" in line and str(run) in line
        assert (run / ".lock").exists()  # still the other writer's
    finally:
        holder.kill()
        holder.wait()


def test_index_into_a_run_that_is_training_is_refused(tmp_path, small_faq, capsys):
    run = _fake_run(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        assert main(["index", str(small_faq), "--out", str(run / "index")]) == 2
        assert f"in use by process {holder.pid}" in one_error_line(capsys)
        assert not (run / "index").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_released(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    assert main(["train", "--output", str(run), "--data", str(tmp_path / "no-such.json")]) == 2
    err = capsys.readouterr().err
    assert f"left by process {dead.pid}, which is no longer running; taken over" in err
    assert "no such file" in err  # it went on to the data
    assert not (run / ".lock").exists()


def test_the_lock_holds_pid_and_host_and_a_created_empty_dir_goes(tmp_path):
    from faqtune.run import run_lock

    run = tmp_path / "new" / "run"
    with run_lock(run):
        assert (run / ".lock").read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(FaqtuneError, match=f"in use by process {os.getpid()}"), run_lock(run):
            pass
    assert not run.exists()


def test_only_rank_0_of_a_launch_takes_the_lock(tmp_path, monkeypatch):
    from faqtune.run import run_lock

    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # rank 0 of this launch holds it
    monkeypatch.setenv("RANK", "1")
    with run_lock(run):
        pass
    assert (run / ".lock").exists()


# ---- 3. output paths are checked before the expensive part ------------------------------------------

@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


@pytest.mark.parametrize("argv", [
    lambda run, out: ["eval", str(run), "--out", str(out)],
    lambda run, out: ["merge", str(run), str(out)],
    lambda run, out: ["index", str(run / "no-such-faq.json"), "--out", str(out)],
    lambda run, out: ["train", "--output", str(out), "--data", str(run / "no-such-faq.json")],
], ids=["eval", "merge", "index", "train"])
@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_an_output_that_cannot_be_a_directory_fails_first(tmp_path, a_file, capsys, argv, where):
    run = _fake_run(tmp_path / "run")
    out = a_file if where == "file" else a_file / "sub"
    assert main(argv(run, out)) == 2
    line = one_error_line(capsys)
    assert str(out) in line
    assert ("is a file, expected a directory" if where == "file" else f"{a_file} is a file") in line


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("argv", [["merge", "RUN", "/proc/faqtune-merged"], ["export-gguf", "RUN", "/proc/x.gguf"]])
def test_an_output_where_nothing_can_be_written_fails_first_even_for_root(tmp_path, capsys, argv):
    """os.access says root may write in /proc (and read-only mounts): the merge failed after its work."""
    run = _fake_run(tmp_path / "run")
    assert main([str(run) if a == "RUN" else a for a in argv]) == 2
    assert one_error_line(capsys).endswith("/proc is not writable" if argv[0] == "merge" else "is not writable")


@pytest.mark.parametrize("argv", [["merge", "RUN", "RUN/adapter/merged"], ["export-gguf", "RUN", "RUN/tb/x.gguf"],
                                  ["index", "FAQ", "--out", "RUN/checkpoints/index"], ["eval", "RUN", "--out", "RUN/index"],
                                  ["index", "FAQ", "--out", "RUN/data"]])
def test_an_output_inside_a_folder_a_run_replaces_is_refused(tmp_path, small_faq, capsys, argv):
    """A merge into RUN/adapter/merged was deleted by the next `train --resume`, with no word."""
    run = _fake_run(tmp_path / "run")
    (run / "data").mkdir()
    (run / "data" / "train.jsonl").write_text("")
    argv = [a.replace("RUN", str(run)).replace("FAQ", str(small_faq)) for a in argv]
    assert main(argv) == 2
    assert "which faqtune replaces whole" in one_error_line(capsys)
    assert main(["index", str(small_faq), "--out", str(tmp_path / "mine" / "data" / "index"), "--embedder-epochs",
                 "0"]) == 0  # a folder named data that is not a run's


def test_export_gguf_output_that_is_a_directory(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    out = tmp_path / "out.gguf"
    out.mkdir()
    assert main(["export-gguf", str(run), str(out)]) == 2
    assert "is a directory, expected a file path" in one_error_line(capsys)


def test_export_gguf_keeps_a_users_modelfile(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    (tmp_path / "out").mkdir()
    modelfile = tmp_path / "out" / "Modelfile"
    modelfile.write_text("FROM ./mine.gguf\nPARAMETER temperature 0.2\n")
    assert main(["export-gguf", str(run), str(tmp_path / "out" / "bot.gguf")]) == 2
    assert f"{modelfile}: already there; pass --force to replace it" in one_error_line(capsys)
    assert modelfile.read_text() == "FROM ./mine.gguf\nPARAMETER temperature 0.2\n"
    assert not (tmp_path / "out" / "bot.gguf").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_directory(tmp_path):
    from faqtune.run import check_output

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(FaqtuneError, match="not writable"):
            check_output(folder / "run")
    finally:
        folder.chmod(0o700)


def test_a_creatable_output_passes(tmp_path):
    from faqtune.run import check_output

    assert check_output(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert check_output(tmp_path / "x.gguf", "file") == tmp_path / "x.gguf"


# ---- 5. damaged run files, bad text, bad limits -----------------------------------------------------

def _adapter(folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file({"a": torch.zeros(64)}, str(folder / "adapter_model.safetensors"))
    return folder


def test_a_truncated_adapter_is_named(tmp_path):
    from faqtune.loading import safe_adapter_dir

    folder = _adapter(tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelError, match="adapter_model.safetensors: damaged or unreadable adapter weights"):
        safe_adapter_dir(folder)


def test_a_bad_adapter_config_is_named(tmp_path):
    from faqtune.loading import safe_adapter_dir

    folder = _adapter(tmp_path / "adapter")
    (folder / "adapter_config.json").write_text('{"peft_type": ')
    with pytest.raises(ModelError, match="adapter_config.json: damaged or unreadable adapter config"):
        safe_adapter_dir(folder)


@pytest.mark.parametrize("command", [["ask", "RUN", "hi?"], ["eval", "RUN"], ["merge", "RUN", "OUT"],
                                     ["train", "--output", "RUN", "--resume"]])
@pytest.mark.parametrize("text", ["", "# nothing\n", "{}\n"])
def test_an_empty_run_config_is_refused(tmp_path, capsys, command, text):
    """An emptied config.yaml read as all defaults: a run trained otherwise answered with the wrong settings."""
    run = _fake_run(tmp_path / "run")
    (run / "config.yaml").write_text(text)  # the header gone with the rest: the run is known by its layout
    (run / "checkpoints").mkdir()
    argv = [str(run) if a == "RUN" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert main(argv) == 2
    assert f"{run / 'config.yaml'}: no settings (damaged?)" in one_error_line(capsys)


def test_a_bad_tokenizer_is_one_line(tmp_path, tiny_base, capsys):
    run = _fake_run(tmp_path / "run", base_model=str(tiny_base))
    (run / "tokenizer").mkdir()
    shutil.copy(tiny_base / "tokenizer_config.json", run / "tokenizer")
    (run / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    assert main(["ask", str(run), "hi?"]) == 2
    assert f"{run / 'tokenizer'}: damaged or unreadable tokenizer" in one_error_line(capsys)


@pytest.mark.parametrize("meta", [{"embedder": "all-MiniLM-L6-v2", "threshold": 0.5}, {"threshold": 0.5}],
                         ids=["no-table", "no-embedder"])
def test_a_damaged_index_is_one_line(tmp_path, meta):
    from faqtune.cli import _open_answerer

    run = _fake_run(tmp_path / "run")
    cfg = RunDir(run).load_config()
    cfg.grounding.mode = "retrieval"
    (run / "index").mkdir()
    (run / "index" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(FaqtuneError) as e:
        _open_answerer(run, None, None, cfg, grounded=True)
    assert str(run / "index") in str(e.value) and "\n" not in str(e.value)


def test_an_ask_argument_that_is_not_utf8(tmp_path, capsys):
    question = b"caf\xe9?".decode("utf-8", "surrogateescape")  # what Python makes of such an argv
    assert main(["ask", str(tmp_path), question]) == 2
    assert "the question is not valid UTF-8" in one_error_line(capsys)


@pytest.mark.parametrize("question", ["", "  \n"])
def test_an_empty_question_is_refused(tmp_path, capsys, question):
    """It was answered with the decline message, exit 0."""
    assert main(["ask", str(tmp_path), question]) == 2
    assert one_error_line(capsys) == "error: the question is empty"


@pytest.mark.parametrize("limit", ["-100", "-1", "0"])
def test_eval_limit_below_one_is_refused_at_parsing(tmp_path, capsys, limit):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path), "--limit", limit])
    assert e.value.code == 2
    assert "--limit: must be >= 1" in capsys.readouterr().err


def test_a_fresh_train_clears_the_logs_of_an_attempt_without_checkpoints(tmp_path):
    from faqtune.checkpoints import prepare_run_dir

    run = RunDir(tmp_path / "run")
    for resume in (True, False):
        run.root.mkdir(exist_ok=True)
        run.metrics_path.write_text('{"step": 1, "loss": 2.0}\n')
        run.tb_dir.mkdir(exist_ok=True)
        (run.tb_dir / "events.out").write_text("x")
        prepare_run_dir(FaqtuneConfig(output_dir=str(run.root)), run, resume=resume)
        assert run.metrics_path.exists() is resume and run.tb_dir.exists() is resume


def test_training_into_a_folder_of_the_users_own_is_refused_and_nothing_touched(tmp_path, tiny_base, capsys):
    """`--output .` in a project folder with data/train.jsonl (the FAQ trained on) cut that FAQ down to the
    training split, replaced data/eval.jsonl and emptied tb/, exit 0."""
    (tmp_path / "data").mkdir()
    (tmp_path / "tb").mkdir()
    faq = tmp_path / "data" / "train.jsonl"
    faq.write_text("".join(json.dumps(r) + "\n" for r in thing_rows(20)))
    (tmp_path / "data" / "eval.jsonl").write_text('{"question": "mine?", "answer": "Mine."}\n')
    (tmp_path / "tb" / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    argv = ["train", "--base", str(tiny_base), "--data", str(faq), "--output", str(tmp_path), "--embedder-epochs", "0"]
    assert main(argv) == 2
    assert "is not empty and holds no faqtune run" in one_error_line(capsys)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("base", ["tiny", "missing"])
def test_a_config_yaml_of_the_users_own_is_no_run_to_train_over(tmp_path, tiny_base, small_faq, capsys, base):
    """A project folder with its own config.yaml was taken for an attempt that died early: train rewrote that
    config.yaml with the run's settings. A base that cannot be loaded wrote the run's settings even into an
    empty folder before failing."""
    theirs = tmp_path / "project"
    theirs.mkdir()
    (theirs / "config.yaml").write_text("services:\n  web: {image: nginx}\n")
    fresh = tmp_path / "fresh"
    base = tiny_base if base == "tiny" else tmp_path / "no-such-base"
    for out in (theirs, fresh):
        argv = ["train", "--base", str(base), "--data", str(small_faq), "--output", str(out), "--embedder-epochs", "0"]
        if out == fresh and base == tiny_base:
            continue
        assert main(argv) == 2
        assert ("does not exist" if out == fresh else "holds no faqtune run") in one_error_line(capsys)
    assert (theirs / "config.yaml").read_text() == "services:\n  web: {image: nginx}\n"
    assert sorted(p.name for p in theirs.iterdir()) == ["config.yaml"] and not fresh.exists()


@pytest.mark.parametrize("modules", ["nonexistent_proj", "q_proj,nonexistent_proj"])
def test_a_target_module_the_base_lacks_is_a_config_problem_naming_its_layers(tmp_path, tiny_base, small_faq, capsys, modules):
    """None matching was PEFT's traceback after the base had loaded; a typo beside a right name trained an
    adapter without it, silently."""
    argv = ["train", "--base", str(tiny_base), "--data", str(small_faq), "--output", str(tmp_path / "run"),
            "--embedder-epochs", "0", "--lora.target_modules", modules]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "`lora.target_modules`: this base has no module named 'nonexistent_proj' " \
        "(its linear layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)" in err
    assert not (tmp_path / "run" / "adapter").exists()


def test_serve_takes_remote_code_only_from_its_command_line(tmp_path, remote_code_base, tiny_base, capsys):
    from faqtune.errors import ModelError
    from faqtune.serve.engine import load_served_models

    base, marker = remote_code_base
    run = _remote_code_run(tmp_path, base, tiny_base)
    (run / "adapter").mkdir()  # the base is loaded before any adapter is read
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    with pytest.raises(ModelError, match="ships its own model code"):
        load_served_models([str(run)])
    assert not marker.exists(), "the base model's own code ran"
    assert "ignored" in capsys.readouterr().err
    with pytest.raises(Exception, match="remote code ran"):
        load_served_models([str(run)], trust_remote_code=True)
    assert marker.exists()


def test_resume_check_reads_an_old_run_as_the_resume_does(tmp_path):
    """A run saved before `grounding.embedder_epochs` existed resumes with 0 (run.SAVED_BEFORE): comparing it
    with a plain load_config (default 1) refused every resume of such a run."""
    from faqtune.checkpoints import check_resume_settings
    from faqtune.config import load_config
    from faqtune.errors import FaqtuneError
    from faqtune.run import load_saved_settings

    path = tmp_path / "config.yaml"
    load_config(None, {"output_dir": str(tmp_path)}).save(path)
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if "embedder_epochs" not in line and "joint_weight" not in line))
    check_resume_settings(load_saved_settings(path, {"train.max_steps": 9}), path)
    with pytest.raises(FaqtuneError, match=r"`lora.r` \(64 -> 8\)"):
        check_resume_settings(load_saved_settings(path, {"lora.r": 8}), path)


def test_a_killed_builds_hidden_folder_is_removed_by_the_next_and_a_live_ones_kept(tmp_path):
    """`merge` and `index` build beside their output; SIGKILLed, the folder stayed (the merge's holds a model)."""
    from faqtune.run import sibling_to_build

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f".merged.merging-{dead.pid}"
    live = tmp_path / f".merged.merging-{os.getppid()}"
    other = tmp_path / f".index.merging-{dead.pid}"
    for folder in (killed, live, other):
        (folder / "weights").mkdir(parents=True)
    fresh = sibling_to_build(tmp_path / "merged", "merging")
    assert fresh == tmp_path / f".merged.merging-{os.getpid()}" and not fresh.exists()
    assert not killed.exists() and live.exists() and other.exists()


def test_weights_made_readable_keep_a_shared_folders_setgid(tmp_path):
    """The modes are added to, not set: a group folder's setgid bit (files written later keep the group) stays."""
    import stat

    from faqtune.run import share_as_umask

    folder = tmp_path / "merged"
    folder.mkdir()
    folder.chmod(0o2750)
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "model.safetensors").chmod(0o600)
    share_as_umask(folder)
    assert folder.stat().st_mode & stat.S_ISGID and (folder / "model.safetensors").stat().st_mode & 0o044


def test_a_base_name_too_long_for_the_file_system_is_one_line(tmp_path, small_faq, capsys):
    """Path.exists() raised ENAMETOOLONG while deciding whether the name is a Hub id: a traceback."""
    argv = ["train", "--base", "x" * 300, "--data", str(small_faq), "--output", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "x" * 50 in one_error_line(capsys) and not (tmp_path / "run").exists()
