"""Checkpoints are sealed by a manifest; a partial, corrupt or tampered one is named and skipped."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from faqtune.checkpoints import MANIFEST, REQUIRED, last_checkpoint, problem, rotate, scan, seal
from faqtune.cli import main
from faqtune.run import RunDir

from .support import assert_same_adapter, copy_run, error_line, sealed


def test_a_finished_run_holds_sealed_checkpoints(reference):
    assert sealed(reference) == ["checkpoint-4", "checkpoint-8", "checkpoint-10"]
    for name in sealed(reference):
        folder = reference / "checkpoints" / name
        manifest = json.loads((folder / MANIFEST).read_text())
        assert set(REQUIRED) <= set(manifest["files"]) and manifest["step"] == int(name.split("-")[1])
        assert problem(folder) is None
    assert last_checkpoint(RunDir(reference).checkpoints_dir) == reference / "checkpoints" / "checkpoint-10"


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped byte": (lambda f: _flip_a_byte(f / "adapter_model.safetensors"),
                     "adapter_model.safetensors does not match its SHA-256 checksum"),
    "truncated file": (lambda f: (f / "optimizer.pt").write_bytes((f / "optimizer.pt").read_bytes()[:100]),
                       "optimizer.pt is 100 bytes"),
    "missing file": (lambda f: (f / "rng_state.pth").unlink(), "rng_state.pth is missing"),
    "no manifest": (lambda f: (f / MANIFEST).unlink(), "partial: no manifest"),
    "garbled manifest": (lambda f: (f / MANIFEST).write_text("{\"files\": [1, 2"), "manifest-json is unreadable"),
    "manifest without the optimizer": (
        lambda f: (f / MANIFEST).write_text(json.dumps({"files": {"trainer_state.json": {}}})),
        "the manifest lists no adapter_model.safetensors, optimizer.pt"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_corrupt_checkpoint_is_named_and_the_previous_one_used(reference, tmp_path, kind):
    run = copy_run(reference, tmp_path / "run")
    newest = run / "checkpoints" / "checkpoint-10"
    corrupt, expected = CORRUPTIONS[kind]
    corrupt(newest)
    found = scan(run / "checkpoints")
    assert found.usable == run / "checkpoints" / "checkpoint-8"
    assert [p for p, _ in found.skipped] == [newest]
    assert expected.replace("manifest-json", MANIFEST) in found.skipped[0][1]
    assert last_checkpoint(RunDir(run).checkpoints_dir, checksums=True) == run / "checkpoints" / "checkpoint-8"


def test_resume_sets_corrupt_checkpoints_aside_and_continues_from_a_good_one(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "run")
    shutil.rmtree(run / "adapter")
    _flip_a_byte(run / "checkpoints" / "checkpoint-10" / "optimizer.pt")
    (run / "checkpoints" / "checkpoint-8" / MANIFEST).unlink()

    assert main(["train", "--output", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint checkpoint-10 is corrupt: optimizer.pt does not match its SHA-256 checksum; set aside as " \
           "checkpoint-10.partial, resuming from checkpoint-4" in err
    assert "checkpoint checkpoint-8 is partial" in err
    # set aside (never reused), then removed once the resumed run sealed a checkpoint of its step again
    assert not list((run / "checkpoints").glob("*.partial"))
    assert_same_adapter(run, reference)


def test_resume_with_no_good_checkpoint_is_one_clear_error(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "run")
    for folder in (run / "checkpoints").glob("checkpoint-*"):
        (folder / MANIFEST).unlink()
    assert main(["train", "--output", str(run), "--resume"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "--resume given but no checkpoint found" in line and "3 partial or corrupt one(s) set aside" in line


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_tampered_checkpoint_is_refused_before_it_is_unpickled(reference, tmp_path, capsys):
    """A pickle swapped into a checkpoint never reaches torch.load: its checksum no longer matches."""
    run = copy_run(reference, tmp_path / "run")
    marker = tmp_path / "code-ran"
    payload = _Boom()
    payload.marker = str(marker)
    for name in sealed(run):
        target = run / "checkpoints" / name / "rng_state.pth"
        size = target.stat().st_size  # same size: only the checksum can tell (pickle ignores the padding)
        target.write_bytes(pickle.dumps(payload).ljust(size, b"\0"))
    assert main(["train", "--output", str(run), "--resume"]) == 2
    assert "does not match its SHA-256 checksum" in capsys.readouterr().err
    assert not marker.exists()


def test_rotation_deletes_only_sealed_checkpoints_beyond_the_limit(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        folder = ckpts / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
        if step != 5:
            seal(folder)
    (ckpts / "checkpoint-9.partial").mkdir()
    deleted = rotate(ckpts, keep=2, protect=ckpts / "checkpoint-1")
    assert sorted(p.name for p in deleted) == ["checkpoint-2"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-1", "checkpoint-3", "checkpoint-4",
                                                       "checkpoint-5", "checkpoint-9.partial"]


def test_set_aside_checkpoints_go_once_a_later_one_is_sealed(tmp_path):
    from faqtune.checkpoints import drop_set_aside

    ckpts = tmp_path / "checkpoints"
    for name in ("checkpoint-4.partial", "checkpoint-8.partial", "checkpoint-12.partial", "checkpoint-8"):
        (ckpts / name).mkdir(parents=True)
    gone = drop_set_aside(ckpts, 8)
    assert sorted(p.name for p in gone) == ["checkpoint-4.partial", "checkpoint-8.partial"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-12.partial", "checkpoint-8"]  # newest fault kept
