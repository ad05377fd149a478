"""Checkpoints of the Accelerate loop load nothing that can run code.

Every file of a checkpoint is replaced in turn by a booby-trapped pickle (unpickling it creates a marker file), with
and without the manifest rewritten to match it (an attacker can do both); pickles under the file names older
versions (accelerate's `save_state`) wrote are put beside a good checkpoint. Resuming never creates the marker: it
refuses with an error naming the file, or ignores the files it does not know.
"""

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loop_runner import RUNNER_ENV, build_model, tokenized_copy_task
from rnn_seq2seq_hf.accelerate_loop import LoopArguments, train_with_accelerate
from rnn_seq2seq_hf.checkpointing import CheckpointError
from test_trainer import pad_batch

FILES = [
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "rng_state_0.safetensors",
    "rng_state_0.json",
    "loop_state.json",
    "manifest.json",
]
# What accelerate's save_state wrote (all pickles but the model), plus other names a loader might try.
OLD_FILES = [
    "optimizer.bin",
    "scheduler.bin",
    "sampler.bin",
    "scaler.pt",
    "random_states_0.pkl",
    "pytorch_model.bin",
    "training_args.bin",
    "trainer_state.pt",
]


class Trap:
    """Unpickling this creates `marker`: proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def trap_bytes(marker: Path, torch_format: bool) -> bytes:
    if not torch_format:
        return pickle.dumps(Trap(marker))
    buffer = __import__("io").BytesIO()
    torch.save({"state": Trap(marker)}, buffer)
    return buffer.getvalue()


def arguments(output_dir: Path, steps: int) -> LoopArguments:
    return LoopArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=0.01,
        logging_steps=1,
        save_steps=2,
        seed=0,
        disable_tqdm=True,
    )


def train(output_dir: Path, steps: int):
    model = build_model(hidden_dropout=0.3)
    return train_with_accelerate(model, tokenized_copy_task(12, seed=4), pad_batch, arguments(output_dir, steps))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A run of 2 steps with its checkpoint-2."""
    run = tmp_path_factory.mktemp("trusted") / "run"
    train(run, 2)
    assert sorted(p.name for p in (run / "checkpoint-2").iterdir()) == sorted(FILES)
    return run


def copy_run(checkpoint: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    return run


def rewrite_manifest(folder: Path, name: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_trap_runs_code_when_unpickled(tmp_path):
    """The trap is real: an unsafe loader (pickle, torch.load(weights_only=False)) creates the marker."""
    marker = tmp_path / "marker"
    pickle.loads(trap_bytes(marker, torch_format=False))
    assert marker.exists()
    marker.unlink()
    (tmp_path / "trap.bin").write_bytes(trap_bytes(marker, torch_format=True))
    torch.load(tmp_path / "trap.bin", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("attacker_rewrites_manifest", [False, True], ids=["manifest-kept", "manifest-rewritten"])
@pytest.mark.parametrize("name", FILES)
def test_a_trapped_checkpoint_file_is_refused_without_running_it(
    checkpoint, tmp_path, name, attacker_rewrites_manifest
):
    run = copy_run(checkpoint, tmp_path)
    marker = tmp_path / "marker"
    folder = run / "checkpoint-2"
    (folder / name).write_bytes(trap_bytes(marker, torch_format=name.endswith(".safetensors")))
    if attacker_rewrites_manifest and name != "manifest.json":
        rewrite_manifest(folder, name)
    with pytest.raises(CheckpointError) as error:
        train(run, 4)
    assert not marker.exists()
    message = str(error.value)
    assert name in message and "\n" not in message
    assert not (run / "checkpoint-4").exists()  # it did not train on


def test_pickles_under_old_or_unknown_names_are_never_read(checkpoint, tmp_path, caplog):
    reference = copy_run(checkpoint, tmp_path / "reference")
    train(reference, 4)

    run = copy_run(checkpoint, tmp_path / "trapped")
    marker = tmp_path / "marker"
    for name in OLD_FILES:
        (run / "checkpoint-2" / name).write_bytes(trap_bytes(marker, torch_format=not name.endswith(".pkl")))
    with caplog.at_level("WARNING", logger="rnn_seq2seq_hf.checkpointing"):
        train(run, 4)
    assert not marker.exists()
    assert "random_states_0.pkl" in caplog.text and "never read" in caplog.text
    expected = load_file(str(reference / "checkpoint-4" / "model.safetensors"))
    got = load_file(str(run / "checkpoint-4" / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in got)


def test_a_checkpoint_of_the_old_pickle_format_is_refused(checkpoint, tmp_path):
    """What accelerate's save_state wrote (pickles, no manifest) is never loaded, and the error says why."""
    run = copy_run(checkpoint, tmp_path)
    folder = run / "checkpoint-2"
    marker = tmp_path / "marker"
    for path in folder.iterdir():
        if path.name not in ("model.safetensors", "loop_state.json"):
            path.unlink()
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (folder / name).write_bytes(trap_bytes(marker, torch_format=not name.endswith(".pkl")))
    with pytest.raises(CheckpointError, match=r"manifest.json: missing .*older versions wrote pickles"):
        train(run, 4)
    assert not marker.exists()


def test_a_run_that_meets_a_trapped_checkpoint_exits_with_an_error_and_runs_nothing(checkpoint, tmp_path):
    """The attack of the original report, end to end: scheduler state replaced (manifest rewritten to match), then
    the training command run again."""
    run = copy_run(checkpoint, tmp_path)  # tests/loop_runner.py's `resume` mode trains into OUT/run
    folder = run / "checkpoint-2"
    marker = tmp_path / "marker"
    (folder / "scheduler.json").write_bytes(trap_bytes(marker, torch_format=False))
    rewrite_manifest(folder, "scheduler.json")
    runner = Path(__file__).resolve().parent / "loop_runner.py"
    command = [sys.executable, str(runner), "resume", str(tmp_path), "--steps", "4"]
    result = subprocess.run(command, env=RUNNER_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert not marker.exists()
    assert "CheckpointError" in result.stderr and "scheduler.json" in result.stderr
