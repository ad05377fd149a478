"""The output folder of a run: atomic model folders (a full disk leaves the previous one intact), the pid lock (a
live run is refused, a stale lock is taken over, the lock goes at exit and on errors), the finished-run guard and the
fingerprint that keeps another run's checkpoints from being resumed."""

import errno
import json
import subprocess
import sys
import textwrap

import pytest

import rnn_seq2seq_hf.run_folder
from rnn_seq2seq_hf.run_folder import (
    LOCK_FILE,
    DiskFullError,
    RunFolder,
    RunFolderError,
    RunLock,
    is_finished_run,
    run_fingerprint,
    write_file_atomically,
    write_folder_atomically,
)


def files(folder):
    return {path.name: path.read_text() for path in sorted(folder.iterdir())}


def test_a_folder_appears_whole_and_replaces_the_previous_one(tmp_path):
    target = tmp_path / "model"
    write_folder_atomically(target, lambda folder: (folder / "weights").write_text("old"))
    seen_during_write = []

    def write(folder):
        (folder / "weights").write_text("new")
        (folder / "config.json").write_text("{}")
        seen_during_write.append(files(target))  # the previous folder is intact while the new one is written

    write_folder_atomically(target, write)
    assert seen_during_write == [{"weights": "old"}]
    assert files(target) == {"config.json": "{}", "weights": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folder left


def test_disk_full_leaves_the_previous_folder_and_says_so_in_one_line(tmp_path):
    target = tmp_path / "model"
    write_folder_atomically(target, lambda folder: (folder / "weights").write_text("old"))

    def write_until_the_disk_is_full(folder):
        (folder / "weights").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as caught:
        write_folder_atomically(target, write_until_the_disk_is_full)
    message = str(caught.value)
    assert "No space left on device" in message and "unchanged" in message and "\n" not in message
    assert files(target) == {"weights": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    class SafetensorsStyleError(Exception):  # safetensors reports the OS error inside its own message
        pass

    def fail(folder):
        raise SafetensorsStyleError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    with pytest.raises(DiskFullError, match="No space left on device"):
        write_folder_atomically(target, fail)
    assert files(target) == {"weights": "old"}


def test_other_errors_leave_the_previous_folder_and_pass_through(tmp_path):
    target = tmp_path / "model"
    write_folder_atomically(target, lambda folder: (folder / "weights").write_text("old"))
    with pytest.raises(KeyError):
        write_folder_atomically(target, lambda folder: {}["boom"])
    assert files(target) == {"weights": "old"}


def test_a_file_is_replaced_whole(tmp_path, monkeypatch):
    path = write_file_atomically(tmp_path / "metrics.json", "old")
    real_fsync = __import__("os").fsync

    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", full)
    with pytest.raises(DiskFullError, match="No space left on device"):
        write_file_atomically(path, "new")
    monkeypatch.setattr("os.fsync", real_fsync)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# Another process holding the lock; it loads run_folder.py alone (no torch or transformers to import: fast).
HOLD_LOCK = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("run_folder", sys.argv[2])
    run_folder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_folder)
    lock = run_folder.RunLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_a_live_run_holds_the_folder_and_a_dead_one_leaves_a_stale_lock_that_is_taken_over(tmp_path, caplog):
    module = rnn_seq2seq_hf.run_folder.__file__
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path), module], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"in use by another training run \(pid {holder.pid}\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(holder.pid)  # killed: the file stays behind
    with caplog.at_level("WARNING"), RunLock(tmp_path) as lock:
        assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(__import__("os").getpid())
        assert lock.descriptor is not None
    assert f"taking over a stale lock of pid {holder.pid} (no longer running)" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_run_folder_releases_its_lock_on_errors_and_refuses_a_finished_run(tmp_path):
    with pytest.raises(ZeroDivisionError), RunFolder(tmp_path, "fp"):
        assert (tmp_path / LOCK_FILE).exists()
        raise ZeroDivisionError
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / "model").mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    assert is_finished_run(tmp_path)
    with pytest.raises(RunFolderError, match="holds a finished run .*--overwrite-output-dir"):
        RunFolder(tmp_path, "fp").__enter__()
    (tmp_path / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    with RunFolder(tmp_path, "other", overwrite=True):
        assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoints").exists()
        assert (tmp_path / "model").is_dir()  # replaced only when the new model is written
    assert json.loads((tmp_path / "run.json").read_text()) == {"fingerprint": "other"}


def test_checkpoints_of_another_run_are_never_resumed(tmp_path):
    with RunFolder(tmp_path, "first"):
        (tmp_path / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    with RunFolder(tmp_path, "first"):  # the same run again: resumes
        pass
    with pytest.raises(RunFolderError, match="holds checkpoints of another run .*changed"):
        RunFolder(tmp_path, "second").__enter__()


def test_the_fingerprint_follows_recipe_and_data_but_not_names():
    recipe = {"task": "translation", "training": {"max_steps": 5}, "name": "a", "source": "x.yaml"}
    base = run_fingerprint(recipe, {"train": ["a b", "c"]}, engine="trainer")
    assert (
        run_fingerprint({**recipe, "name": "b", "source": "y.yaml"}, {"train": ["a b", "c"]}, engine="trainer") == base
    )
    assert run_fingerprint(recipe, {"train": ["a", "b c"]}, engine="trainer") != base
    assert run_fingerprint({**recipe, "training": {"max_steps": 6}}, {"train": ["a b", "c"]}, engine="trainer") != base
    assert run_fingerprint(recipe, {"train": ["a b", "c"]}, engine="accelerate") != base
