"""Data-parallel training on 2 CPU processes (torchrun + gloo), exact resume after SIGKILL, and crash-safe
checkpoints. The runs themselves are in loop_runner.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

RUNNER = Path(__file__).resolve().parent / "loop_runner.py"
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(args: list[str], processes: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [sys.executable, str(RUNNER), *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            str(RUNNER), *args,
        ]  # fmt: skip
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "weights.safetensors"))


def assert_same_weights(a: dict, b: dict, tolerance: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tolerance, rtol=tolerance, msg=name)


@pytest.mark.parametrize("mode", ["loop", "trainer"])
def test_two_processes_end_with_the_weights_of_one_process_with_the_same_global_batch(tmp_path, mode):
    run([mode, str(tmp_path / "one"), "--global-batch", "8"])
    # 2 processes x per-device batch 2 x 2 accumulation steps = the same global batch of 8
    run([mode, str(tmp_path / "two"), "--global-batch", "8", "--accumulation", "2"], processes=2)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), tolerance=1e-5)
    one, two = (json.loads((tmp_path / run_ / "log.json").read_text()) for run_ in ("one", "two"))
    losses = [entry["loss"] for entry in one] if mode == "loop" else one
    losses_two = [entry["loss"] for entry in two] if mode == "loop" else two
    assert losses_two == pytest.approx(losses, rel=1e-4)


def test_evaluation_over_two_processes_scores_every_example_exactly_once(tmp_path):
    run(["eval", str(tmp_path)], processes=2)
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["example_ids"] == list(range(7))
    assert metrics["eval_examples"] == 7 and {"eval_bleu", "eval_chrf", "eval_loss"} <= metrics.keys()


def test_models_train_under_ddp_without_unused_parameters_in_any_configuration(tmp_path):
    run(["configs", str(tmp_path)], processes=2)
    assert json.loads((tmp_path / "configs.json").read_text()) == {"variants": 14, "world": 2}


def test_sigkill_during_training_then_resume_gives_the_uninterrupted_result(tmp_path):
    reference = tmp_path / "reference"
    run(["resume", str(reference), "--steps", "10"])

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, str(RUNNER), "resume", str(interrupted), "--steps", "10", "--slow", "0.5"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (interrupted / "run" / "checkpoint-4").is_dir():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.7)  # somewhere in step 5 or 6
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "weights.safetensors").exists()  # it really died before finishing

    run(["resume", str(interrupted), "--steps", "10"])  # same command: resumes from the newest checkpoint
    assert_same_weights(weights(reference), weights(interrupted), tolerance=0)
    reference_log = json.loads((reference / "log.json").read_text())
    assert json.loads((interrupted / "log.json").read_text()) == reference_log
    assert reference_log[-1]["step"] == 10


def test_two_processes_killed_mid_logging_window_resume_to_the_same_weights_and_log(tmp_path):
    """Every process's RNG states (dropout differs per process) and the running loss of the logging window are in
    the checkpoint: with logs every 5 steps and checkpoints every 2, the job dies and resumes inside a window."""
    arguments = ["--steps", "10", "--logging-steps", "5"]
    reference = tmp_path / "reference"
    run(["resume", str(reference), *arguments], processes=2)

    interrupted = tmp_path / "interrupted"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(RUNNER), "resume", str(interrupted), *arguments, "--slow", "0.5",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (interrupted / "run" / "checkpoint-4").is_dir():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    for rank in range(2):  # the whole job dies at once, as on a machine failure
        os.kill(int((interrupted / f"pid-{rank}").read_text()), signal.SIGKILL)
    process.wait(timeout=120)
    assert not (interrupted / "weights.safetensors").exists()
    newest = max(int(p.name.split("-")[1]) for p in (interrupted / "run").glob("checkpoint-*"))
    assert newest % 5, "resumes inside a logging window"

    run(["resume", str(interrupted), *arguments], processes=2)
    assert_same_weights(weights(reference), weights(interrupted), tolerance=0)
    reference_log = json.loads((reference / "log.json").read_text())
    assert json.loads((interrupted / "log.json").read_text()) == reference_log
    assert [entry["step"] for entry in reference_log] == [5, 10]


def test_crash_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path):
    reference = tmp_path / "reference"
    run(["resume", str(reference), "--steps", "8"])

    crashed = tmp_path / "crashed"
    result = subprocess.run(
        [sys.executable, str(RUNNER), "resume", str(crashed), "--steps", "8", "--crash-in-save", "3"],
        env=ENV,
        capture_output=True,
        timeout=600,
    )
    assert result.returncode == -signal.SIGKILL
    run_dir = crashed / "run"
    # killed while writing checkpoint 3 (step 6): its model file is in the temporary folder, the rest is missing
    assert (run_dir / ".tmp-checkpoint-6" / "model.safetensors").is_file()
    assert not (run_dir / "checkpoint-6").exists()
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    run(["resume", str(crashed), "--steps", "8"])
    assert not list(run_dir.glob(".tmp-*"))
    assert_same_weights(weights(reference), weights(crashed), tolerance=0)
    assert json.loads((crashed / "log.json").read_text()) == json.loads((reference / "log.json").read_text())


def test_a_launch_that_accelerate_did_not_see_is_refused(monkeypatch, tmp_path):
    """torchrun sets WORLD_SIZE; if accelerate still runs one process, every process would train alone."""
    from loop_runner import build_model, tokenized_copy_task
    from rnn_seq2seq_hf.accelerate_loop import LoopArguments, train_with_accelerate
    from test_trainer import pad_batch

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="launched as 2 processes"):
        train_with_accelerate(build_model(), tokenized_copy_task(4, 0), pad_batch, LoopArguments(str(tmp_path)))
