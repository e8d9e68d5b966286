"""CPU training memory: kernel-shape buckets for packed micro-batches, the heap handed back, the base read from
a bf16 copy of faqtune's own cache, parameters copied out of the mapped weight file, and a stage (indexing) run
in a child process whose memory leaves with it."""

from __future__ import annotations

import os
import platform
import shutil
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from faqtune import memory, models
from faqtune.config import load_config
from faqtune.errors import FaqtuneError
from faqtune.prompting import encode_conversation
from faqtune.run import RunDir

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc's malloc")


@glibc
def test_heap_calls_reach_glibc():
    assert memory.bound_heap() is True
    assert memory.release_freed_memory() is True


_MAPPED_PROBE = r"""
import ctypes, torch
from faqtune import memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
mapped = lambda: libc.mallinfo2().hblkhd
size = 3 * 2**20 // 4  # 3 MiB of float32: above the load's 1 MiB, below the 8 MiB training threshold
memory.bound_heap()
with memory.mapped_temporaries():
    before = mapped(); inside = torch.ones(size); grew_inside = mapped() - before
before = mapped(); after = torch.ones(size); grew_after = mapped() - before
print(grew_inside >= 3 * 2**20, grew_after < 2**20)
"""


@glibc
def test_mapped_temporaries_serves_mib_allocations_from_their_own_mappings_then_restores():
    """A base's load quantizes through temporaries of a few MB; inside the block they must get their own
    mappings where a fresh heap would have grown (fragmented, it kept up to 0.5 GB after a load), and after it
    the training threshold (8 MiB) is back. In a fresh process, as a load early in `faqtune train` is: glibc
    serves any size from a free heap chunk that fits, whatever the threshold."""
    import ctypes
    import subprocess
    import sys

    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    out = subprocess.run([sys.executable, "-c", _MAPPED_PROBE], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    assert out[-2:] == ["True", "True"], out


def test_packed_micro_batches_are_padded_to_a_kernel_bucket_on_cpu(tmp_path):
    from faqtune.train import _training_args

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    cfg = load_config(None, {"output_dir": str(tmp_path / "run")})
    assert cfg.train.packing
    assert _training_args(cfg, RunDir(cfg.output_dir), has_eval=False).pad_to_multiple_of == memory.PACK_MULTIPLE
    cfg = load_config(None, {"output_dir": str(tmp_path / "run"), "train.packing": "false"})
    assert _training_args(cfg, RunDir(cfg.output_dir), has_eval=False).pad_to_multiple_of is None


def test_bucket_padding_changes_neither_the_loss_nor_the_token_count(tiny_base, tiny_tokenizer):
    """The padding of a packed micro-batch is trained on by nothing and attended to by nothing."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from faqtune.train import FaqTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    rows = []
    for i in range(3):
        enc = encode_conversation(tiny_tokenizer, [{"role": "user", "content": f"Where is order {i}?"},
                                                   {"role": "assistant", "content": "In two days. " * (i + 1)}], 512)
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    losses, lengths, trained = [], [], []
    for multiple in (None, memory.PACK_MULTIPLE):
        batch = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.eos_token_id, padding_free=True,
                                                pad_to_multiple_of=multiple)(rows)
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids")}
        fake = SimpleNamespace(args=SimpleNamespace(average_tokens_across_devices=False),
                               _metrics=defaultdict(lambda: defaultdict(list)))
        with torch.no_grad():
            losses.append(FaqTrainer.compute_loss(fake, model, dict(batch)))
        lengths.append(batch["input_ids"].shape[1])
        trained.append(int((batch["labels"] != -100).sum()))
    assert lengths[0] % memory.PACK_MULTIPLE != 0 and lengths[1] % memory.PACK_MULTIPLE == 0
    assert lengths[1] > lengths[0]
    assert trained[0] == trained[1]
    assert torch.allclose(losses[0], losses[1], atol=1e-5), losses


def _cached_copy(tiny_base, home, monkeypatch):
    """The tiny Llama in fp32, placed in faqtune's model cache under `home`, as the embedded default is."""
    monkeypatch.setenv("FAQTUNE_HOME", str(home))
    target = home / "models" / "tiny"
    shutil.copytree(tiny_base, target)
    return target


def _model_folder(path, marker: str):
    path.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (path / name).write_text(marker)
    return path


def test_a_model_folder_another_process_installed_meanwhile_is_kept(tmp_path):
    """Two faqtune commands converting the embedded default on first use: the second must not remove the
    folder the first installed and is reading (seen: 'Couldn't instantiate the backend tokenizer')."""
    target = _model_folder(tmp_path / "model", "first")
    tmp = _model_folder(tmp_path / ".model-tmp", "second")
    models.install_folder(tmp, target)
    assert (target / "config.json").read_text() == "first"
    assert tmp.exists()  # left for the caller's cleanup


def test_an_incomplete_model_folder_is_replaced_and_a_missing_one_installed(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("half")  # no weights: a copy cut short by hand
    models.install_folder(_model_folder(tmp_path / ".a", "new"), target)
    assert (target / "model.safetensors").read_text() == "new"
    fresh = tmp_path / "fresh"
    models.install_folder(_model_folder(tmp_path / ".b", "b"), fresh)
    assert (fresh / "config.json").read_text() == "b" and not (tmp_path / ".b").exists()


def test_a_cached_base_is_read_from_a_bf16_copy_with_the_same_weights(tiny_base, tmp_path, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cached = _cached_copy(tiny_base, tmp_path / "home", monkeypatch)
    copy = models.weights_for(str(cached), torch.bfloat16)
    assert copy == str(cached) + "-bf16"
    with safe_open(f"{copy}/model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert models.weights_for(str(cached), torch.bfloat16) == copy  # made once
    assert models.weights_for(str(cached), torch.float32) == str(cached)  # fp32 compute reads the fp32 file
    assert models.weights_for(str(tiny_base), torch.bfloat16) == str(tiny_base)  # a user's folder: as given
    original = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.bfloat16).state_dict()
    converted = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.bfloat16).state_dict()
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[k], converted[k]) for k in original)


def test_the_loaded_base_names_the_model_not_its_bf16_copy(tiny_base, tmp_path, monkeypatch):
    cached = _cached_copy(tiny_base, tmp_path / "home", monkeypatch)
    cfg = load_config(None, {"base_model": str(cached), "quantization.compute_dtype": "bf16"})
    model = models.load_base_model(str(cached), cfg)
    assert (tmp_path / "home" / "models" / "tiny-bf16").exists()
    assert model.name_or_path == str(cached)
    assert model.config.name_or_path == str(cached)


def test_parameters_left_on_the_mapped_file_are_copied_out(tiny_base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)  # the file's own dtype
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    copied = models.release_weight_files(model)
    assert copied == len(before)  # tied weights counted once
    for name, param in model.named_parameters():
        assert param.data_ptr() != before[name][0]
        assert torch.equal(param, before[name][1])
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_the_heap_is_handed_back_every_few_steps(monkeypatch):
    from faqtune import train

    calls = []
    monkeypatch.setattr(train, "release_freed_memory", lambda: calls.append(1) or True)
    callback = train.ReleaseMemoryCallback(every=3)
    for step in range(1, 10):
        callback.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert len(calls) == 3  # steps 3, 6, 9
    assert train.ReleaseMemoryCallback().every == memory.RELEASE_EVERY


def test_a_cache_that_cannot_be_written_falls_back_to_the_fp32_file(tiny_base, tmp_path, monkeypatch):
    import tempfile

    cached = _cached_copy(tiny_base, tmp_path / "home", monkeypatch)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    assert models.weights_for(str(cached), torch.bfloat16) == str(cached)
    assert not (tmp_path / "home" / "models" / "tiny-bf16").exists()


def test_quantized_weights_are_not_copied(tiny_base):
    """4-bit packed and 8-bit integer weights were made in the heap by the quantizer: nothing to copy."""
    for mode in ("4bit", "8bit"):
        cfg = load_config(None, {"base_model": str(tiny_base), "quantization.mode": mode})
        model = models.load_base_model(str(tiny_base), cfg)
        quantized = {n: p.data_ptr() for n, p in model.named_parameters() if not p.is_floating_point()}
        assert quantized, mode
        models.release_weight_files(model)
        assert {n: p.data_ptr() for n, p in model.named_parameters() if not p.is_floating_point()} == quantized


# --- a stage in a child process ------------------------------------------------------------------------------

@pytest.mark.pipeline
def test_fresh_process_returns_the_childs_result_with_this_thread_count():
    threads = torch.get_num_threads()
    assert memory.in_fresh_process(os.getpid) != os.getpid()
    assert memory.in_fresh_process(torch.get_num_threads) == threads


@pytest.mark.pipeline
def test_fresh_process_raises_the_childs_errors_here(tmp_path):
    from faqtune.data import load_faq
    from faqtune.errors import DataError, ModelError
    from faqtune.retrieval import load_embedder

    bad = tmp_path / "faq.json"
    bad.write_text('[{"question": "q?"}]')
    with pytest.raises(DataError) as here:
        load_faq(bad)
    with pytest.raises(FaqtuneError) as there:  # DataError cannot be rebuilt from its pickle: same message
        memory.in_fresh_process(load_faq, bad)
    assert str(there.value) == str(here.value) and str(bad) in str(there.value)
    with pytest.raises(ModelError, match="no-such-embedder"):  # a class that can be rebuilt stays itself
        memory.in_fresh_process(load_embedder, str(tmp_path / "no-such-embedder"))


@pytest.mark.pipeline
def test_a_child_that_dies_is_an_error_not_a_hang():
    with pytest.raises(FaqtuneError, match="died"):
        memory.in_fresh_process(os._exit, 3)


@pytest.mark.pipeline
def test_ctrl_c_ends_the_child_in_silence(capfd):
    """Ctrl-C while training built its index in the child printed the child's traceback ("Process
    SpawnProcess-1: Traceback ...") before the parent's "interrupted"."""
    import signal

    try:
        with pytest.raises(FaqtuneError, match="died"):  # the parent, interrupted too, says "interrupted"
            memory.in_fresh_process(signal.raise_signal, signal.SIGINT)
    except KeyboardInterrupt:
        pytest.fail("the child's KeyboardInterrupt reached the parent")
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.pipeline
def test_a_script_without_a_main_guard_gets_the_reason(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text("import os\nfrom faqtune.errors import FaqtuneError\nfrom faqtune.memory import in_fresh_process\n"
                      "try:\n    in_fresh_process(os.getpid)\nexcept FaqtuneError as e:\n    print('ERROR', e)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert "ERROR" in out.stdout and '__name__ == "__main__"' in out.stdout, out.stdout + out.stderr[-2000:]


def test_without_child_processes_the_call_runs_here(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no semaphores")

    monkeypatch.setattr(memory, "ProcessPoolExecutor", refuse)
    assert memory.in_fresh_process(os.getpid) == os.getpid()


@pytest.mark.pipeline
def test_grounding_in_a_child_process_is_grounding_here(bundled, tmp_path):
    from faqtune.grounding import ground_splits

    cfg = load_config(None, {"grounding.threshold": "0.5"})  # no calibration: the test is about the process
    splits = [(bundled[:6], list(range(6))), (bundled[6:8], [6, 7])]
    here = ground_splits(tmp_path / "here", bundled, splits, cfg)
    there = memory.in_fresh_process(ground_splits, tmp_path / "there", bundled, splits, cfg)
    assert there == here
    assert len(here[1][0]) >= 6 and here[1][0] != bundled[:6]  # grounded: retrieved entries in the prompts


@pytest.mark.pipeline
def test_grounded_training_never_imports_the_index_libraries(tiny_base, tmp_path):
    """The training process itself: the embedder, LanceDB and sentence-transformers are the child's alone."""
    import json
    import subprocess
    import sys

    faq = tmp_path / "faq.json"
    faq.write_text(json.dumps([{"question": f"How do I do thing number {i}?", "answer": f"Thing {i} is on page {i}."}
                               for i in range(6)]))
    script = (
        "import sys\n"
        "from faqtune.config import load_config\n"
        "from faqtune.train import train\n"
        f"cfg = load_config(None, {{'base_model': {str(tiny_base)!r}, 'data.path': {str(faq)!r}, "
        f"'output_dir': {str(tmp_path / 'run')!r}, 'train.max_steps': '1', 'lora.r': '4', 'data.eval_fraction': '0'}})\n"
        "assert cfg.grounding.mode == 'retrieval'\n"
        "train(cfg)\n"
        "print('LOADED', sorted(m for m in ('lancedb', 'sentence_transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout, out.stdout
    assert (tmp_path / "run" / "index" / "index.json").is_file()  # the child did build the run's index
