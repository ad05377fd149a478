"""Stateful truncated-BPTT training of the language models: the streams and windows (every token a target once per
epoch), both engines against a hand-written loop over the stream (carried, detached state; gradient accumulation;
the learning rate scaled by the window length), stateful evaluation, exact resume of the Accelerate loop with the
carried state in the checkpoint, and Trainer specifics. (Two processes: test_distributed_tbptt.)"""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from accelerate.data_loader import skip_first_batches
from accelerate.state import AcceleratorState
from transformers import TrainingArguments

from helpers import tiny_lm_config
from rnn_seq2seq_hf import RNNLMForCausalLM
from rnn_seq2seq_hf.accelerate_loop import LoopArguments, train_with_accelerate
from rnn_seq2seq_hf.checkpointing import CheckpointError
from rnn_seq2seq_hf.inference import evaluate_perplexity
from rnn_seq2seq_hf.lm_streams import StreamDataLoader, TokenStream, rescale_to_total
from rnn_seq2seq_hf.tbptt import (
    CarriedState,
    EvaluationStream,
    TBPTTSettings,
    TBPTTTrainer,
    fit_language_model_tbptt,
    stream_loss,
)
from test_accelerate_loop import StopAfter, crash_after

VOCAB = 23


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps its state in a process-wide singleton: a Trainer with bf16=True in an earlier test would make
    the loop's Accelerator(mixed_precision="no") refuse to start."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def token_stream(length: int, seed: int = 0) -> np.ndarray:
    """A text with structure (runs of counting tokens), so a model learns something and states matter."""
    generator = np.random.default_rng(seed)
    tokens = []
    while len(tokens) < length:
        start, run = generator.integers(3, VOCAB), generator.integers(2, 9)
        tokens.extend(3 + (start + i) % (VOCAB - 3) for i in range(run))
    return np.array(tokens[:length], dtype=np.int64)


def lm(seed: int = 0, **overrides) -> RNNLMForCausalLM:
    torch.manual_seed(seed)
    values = dict(initializer_range=0.1, hidden_size=16, embedding_size=12)
    values.update(overrides)
    return RNNLMForCausalLM(tiny_lm_config(**values))


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same(a: dict, b: dict, tolerance: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tolerance, rtol=tolerance, msg=name)


# --- the streams and windows -------------------------------------------------------------------------------------


@pytest.mark.parametrize("random_lengths", [False, True])
@pytest.mark.parametrize(("per_device", "accumulation", "processes"), [(4, 1, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2)])
def test_the_streams_partition_the_text_and_every_token_is_a_target_once_per_epoch(
    random_lengths, per_device, accumulation, processes
):
    tokens = np.arange(1003) % 1000  # token i is i: positions are visible in the values
    stream = TokenStream(tokens, bptt=7, random_window_lengths=random_lengths, seed=3)
    views = [stream.windows(per_device, accumulation, p, processes) for p in range(processes)]
    streams = per_device * accumulation * processes
    part = 1003 // streams
    assert all(len(view) == len(views[0]) for view in views)
    for epoch in (0, 1):
        inputs = {row: [] for row in range(streams)}
        targets = {row: [] for row in range(streams)}
        for p, view in enumerate(views):
            for batch in view.batches(epoch):
                assert batch["epoch"] == epoch
                assert torch.equal(batch["labels"], batch["input_ids"])
                for r in range(per_device):
                    row = (p * accumulation + batch["slot"]) * per_device + r
                    inputs[row].extend(batch["input_ids"][r].tolist())
                    targets[row].extend(batch["shift_labels"][r].tolist())
        for row in range(streams):  # stream `row` is the contiguous part `row` of the text
            assert inputs[row] == list(range(row * part, (row + 1) * part - 1))
            assert targets[row] == list(range(row * part + 1, (row + 1) * part))


def test_window_lengths_fixed_or_drawn_around_bptt_the_same_on_every_process():
    tokens = np.zeros(20_000, dtype=np.int64)
    fixed = TokenStream(tokens, bptt=35).windows(10)
    assert fixed.window_lengths(0) == [35] * 57 + [1999 - 35 * 57] == fixed.window_lengths(1)
    stream = TokenStream(tokens, bptt=35, random_window_lengths=True, seed=1)
    a, b = stream.windows(5, 1, 0, 2), stream.windows(5, 1, 1, 2)
    epoch0, epoch1 = a.window_lengths(0), a.window_lengths(1)
    assert epoch0 == b.window_lengths(0) and epoch0 != epoch1  # same windows on every process, new ones each epoch
    for lengths in (epoch0, epoch1):
        assert len(lengths) == 58 and sum(lengths) == 1999 and min(lengths) >= 1
        assert 5 < np.std(lengths) < 15 and min(lengths) < 25  # spread around 35, some halved windows
    reseeded = TokenStream(tokens, bptt=35, random_window_lengths=True, seed=2).windows(5, 1, 0, 2)
    assert reseeded.window_lengths(0) != epoch0


def test_rescaling_keeps_proportions_and_the_total():
    lengths = rescale_to_total(np.array([10, 20, 30, 40]), 50)
    assert sum(lengths) == 50 and lengths == sorted(lengths) and min(lengths) >= 1
    assert rescale_to_total(np.array([5, 5, 5]), 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="cannot cut 2 tokens into 3 windows"):
        rescale_to_total(np.array([5, 5, 5]), 2)


def test_bad_stream_settings_are_refused():
    with pytest.raises(ValueError, match="`bptt`"):
        TokenStream(np.arange(10), bptt=0)
    with pytest.raises(ValueError, match="`random_window_lengths`"):
        TokenStream(np.arange(10), bptt=3, random_window_lengths="yes")
    with pytest.raises(ValueError, match="too few for 8 streams"):
        TokenStream(np.arange(10), bptt=3).windows(4, 2)
    with pytest.raises(ValueError, match="`block_size`"):
        TBPTTSettings(bptt=-1)
    with pytest.raises(ValueError, match="evaluation `batch_size`"):
        EvaluationStream(np.arange(10), batch_size=0)


def test_the_trainer_loader_reads_in_order_and_its_epoch_survives_the_resume_wrapper():
    windows = TokenStream(token_stream(400), bptt=6, random_window_lengths=True).windows(3, 2)
    loader = StreamDataLoader(windows)
    loader.set_epoch(1)
    expected = list(windows.batches(1))
    got = list(loader)
    assert len(got) == len(loader) == len(windows) and all(
        torch.equal(a["input_ids"], b["input_ids"]) and a["slot"] == b["slot"] for a, b in zip(got, expected)
    )
    resumed = skip_first_batches(loader, 5)  # what Trainer does on resume, then set_epoch through the wrapper
    resumed.batch_sampler.batch_sampler.set_epoch(2)
    expected = list(windows.batches(2, start=5))
    assert [b["window"] for b in resumed] == [b["window"] for b in expected]
    assert all(torch.equal(a["shift_labels"], b["shift_labels"]) for a, b in zip(resumed, expected))


# --- both engines against a hand-written loop over the stream ----------------------------------------------------


def hand_loop(model, tokens, streams, bptt, epochs, lr, random_lengths=False, scale_lr=False, seed=0, sgd=False):
    """Truncated BPTT written out: the text as `streams` rows, windows in order, the state of each window the
    detached final state of the one before, zero at every epoch; AdamW (or SGD) on the mean token loss of each
    window. Returns the losses of the steps."""
    part = len(tokens) // streams
    data = torch.from_numpy(tokens[: part * streams]).view(streams, part)
    view = TokenStream(tokens, bptt, random_lengths, seed).windows(streams)  # only for the window lengths
    if sgd:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for epoch in range(epochs):
        cache, start = None, 0
        for length in view.window_lengths(epoch):
            x, y = data[:, start : start + length], data[:, start + 1 : start + length + 1]
            out = model(input_ids=x, cache=cache, use_cache=True)
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = lr * length / bptt if scale_lr else lr
            optimizer.step()
            optimizer.zero_grad()
            cache = out.cache.detach_()
            start += length
            losses.append(loss.item())
    return losses


def run_loop(
    model, tokens, tmp_path, per_device, accumulation, bptt, epochs, lr, random_lengths=False, scale=False, optim=None
):
    args = LoopArguments(
        optim=optim or "adamw_torch",
        output_dir=str(tmp_path / "loop"),
        num_train_epochs=epochs,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=None,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    stream = TokenStream(tokens, bptt, random_lengths, seed=0)
    model, state, _ = train_with_accelerate(model, stream, None, args, scale_lr_by_window_length=scale)
    return model, [entry["loss"] for entry in state.log_history if "loss" in entry]


def run_trainer(
    model, tokens, tmp_path, per_device, accumulation, bptt, epochs, lr, random_lengths=False, scale=False, optim=None
):
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        num_train_epochs=epochs,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        optim=optim or "adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    stream = TokenStream(tokens, bptt, random_lengths, seed=0)
    trainer = TBPTTTrainer(model=model, args=args, train_stream=stream, scale_lr_by_window_length=scale)
    trainer.train()
    return trainer.model, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


ENGINES = {"loop": run_loop, "trainer": run_trainer}


@pytest.mark.parametrize("engine", ["loop", "trainer"])
@pytest.mark.parametrize(("per_device", "accumulation"), [(4, 1), (2, 2), (1, 4)])
def test_training_equals_the_hand_written_truncated_bptt_loop(tmp_path, engine, per_device, accumulation):
    """4 streams, windows of 5, 2 epochs: the engines with any split of the 4 streams into accumulated micro-batches
    end with the weights and losses of the hand loop (state carried and detached, reset every epoch)."""
    tokens = token_stream(203)
    reference = lm()
    losses = hand_loop(reference, tokens, streams=4, bptt=5, epochs=2, lr=0.01)
    model, logged = ENGINES[engine](lm(), tokens, tmp_path, per_device, accumulation, bptt=5, epochs=2, lr=0.01)
    assert len(logged) == len(losses) == 2 * 10
    assert logged == pytest.approx(losses, rel=1e-5)
    assert_same(weights(model), weights(reference), tolerance=1e-5)


@pytest.mark.parametrize("engine", ["loop", "trainer"])
def test_random_windows_with_the_learning_rate_scaled_by_their_length(tmp_path, engine):
    tokens = token_stream(403)
    reference = lm()
    losses = hand_loop(reference, tokens, 4, bptt=8, epochs=2, lr=0.01, random_lengths=True, scale_lr=True)
    model, logged = ENGINES[engine](lm(), tokens, tmp_path, 2, 2, 8, 2, 0.01, random_lengths=True, scale=True)
    assert logged == pytest.approx(losses, rel=1e-5)
    assert_same(weights(model), weights(reference), tolerance=1e-5)


@pytest.mark.parametrize("engine", ["loop", "trainer"])
def test_plain_sgd_as_the_classic_rnn_language_models_train(tmp_path, engine):
    """optim="sgd" (no momentum) with a large learning rate, as Zaremba et al. and PyTorch's word_language_model."""
    tokens = token_stream(203)
    reference = lm()
    losses = hand_loop(reference, tokens, streams=4, bptt=5, epochs=1, lr=1.0, sgd=True)
    model, logged = ENGINES[engine](lm(), tokens, tmp_path, 2, 2, bptt=5, epochs=1, lr=1.0, optim="sgd")
    assert logged == pytest.approx(losses, rel=1e-5)
    assert_same(weights(model), weights(reference), tolerance=1e-5)


def test_the_carried_state_is_the_state_an_unbroken_forward_pass_has_there():
    """What the second window sees: the same logits as one forward pass over both windows (the state carried, not
    reset); its gradient stops at the window's start (truncation)."""
    model = lm().train()
    data = torch.from_numpy(token_stream(40)).view(2, 20)
    carried = CarriedState()
    first = model(input_ids=data[:, :10], cache=carried.cache_for(0, 0, 0), use_cache=True)
    carried.keep(0, 0, 0, first.cache)
    second = model(input_ids=data[:, 10:19], cache=carried.cache_for(0, 1, 0), use_cache=True)
    whole = model(input_ids=data[:, :19])
    torch.testing.assert_close(second.logits, whole.logits[:, 10:], atol=1e-5, rtol=1e-5)
    assert carried.cache_for(0, 3, 0) is None  # not the next window: a zero state
    embedding = model.model.embed_tokens.weight
    grad = torch.autograd.grad(second.logits.sum(), embedding)[0]
    only_first = sorted(set(data[:, :10].flatten().tolist()) - set(data[:, 10:19].flatten().tolist()))
    assert torch.all(grad[only_first] == 0)  # nothing flows back into the first window


# --- stateful evaluation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1000, 1003, 27])
def test_stream_evaluation_equals_evaluate_perplexity_and_splits_across_processes(length):
    model = lm()
    tokens = token_stream(length)
    reference = evaluate_perplexity(model, tokens, batch_size=10, block_size=7)
    evaluation = EvaluationStream(tokens, batch_size=10, block_size=7)
    nll, count = stream_loss(model, evaluation)
    assert int(count) == reference["tokens"]
    assert (nll / count).item() == pytest.approx(reference["nats_per_token"], rel=1e-6)
    shares = [stream_loss(model, evaluation, p, 3) for p in range(3)]  # three processes
    assert sum(int(c) for _, c in shares) == int(count)
    assert sum(n for n, _ in shares).item() == pytest.approx(nll.item(), rel=1e-6)  # float32 sums


# --- exact resume of the Accelerate loop -------------------------------------------------------------------------


def resumable_run(tmp_path, steps: int):
    model = lm(
        hidden_dropout=0.3, embedding_dropout=0.2, output_dropout=0.2, weight_dropout=0.3, variational_dropout=True
    )
    args = LoopArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=0.01,
        warmup_steps=2,
        logging_steps=3,
        save_steps=2,
        save_total_limit=2,
        seed=0,
        disable_tqdm=True,
    )
    stream = TokenStream(token_stream(403), bptt=7, random_window_lengths=True, seed=0)
    eval_stream = EvaluationStream(token_stream(200, seed=9), batch_size=3, block_size=9)
    return train_with_accelerate(model, stream, None, args, eval_dataset=eval_stream, scale_lr_by_window_length=True)


def test_a_crashed_tbptt_run_resumes_to_the_uninterrupted_weights_and_log(tmp_path, monkeypatch):
    """Dropout of every kind on, random windows, learning rate scaled, accumulation: the carried states are in the
    checkpoints (stream_state_0.safetensors) and the resumed run ends exactly as the uninterrupted one, across an
    epoch boundary (15 windows per epoch)."""
    reference, reference_state, _ = resumable_run(tmp_path / "reference", steps=20)
    with monkeypatch.context() as patch:
        crash_after(patch, 17)
        with pytest.raises(StopAfter):
            resumable_run(tmp_path / "crashed", steps=20)
    folder = tmp_path / "crashed" / "run" / "checkpoint-16"
    assert (folder / "stream_state_0.safetensors").is_file()
    position = json.loads((folder / "loop_state.json").read_text())["state"]
    assert (position["epoch"], position["batches_in_epoch"]) == (1, 2)  # window 1 of epoch 1, slots 0 and 1
    resumed, resumed_state, _ = resumable_run(tmp_path / "crashed", steps=20)
    assert_same(weights(resumed), weights(reference), tolerance=0)
    assert resumed_state.log_history == reference_state.log_history


def test_a_checkpoint_without_carried_states_is_refused(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        crash_after(patch, 3)
        with pytest.raises(StopAfter):
            resumable_run(tmp_path, steps=6)
    folder = tmp_path / "run" / "checkpoint-2"
    for old in (tmp_path / "run").glob("checkpoint-*"):
        if old != folder:
            shutil.rmtree(old)
    (folder / "stream_state_0.safetensors").unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["stream_state_0.safetensors"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="stream_state_0.safetensors: not listed in the manifest"):
        resumable_run(tmp_path, steps=6)


# --- Trainer specifics and the entry point -----------------------------------------------------------------------


def test_trainer_refuses_label_smoothing_and_datasets(tmp_path):
    stream = TokenStream(token_stream(100), bptt=5)
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        TBPTTTrainer(model=lm(), args=args, train_stream=stream)
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", dataloader_num_workers=1,
        dataloader_persistent_workers=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="dataloader_persistent_workers"):
        TBPTTTrainer(model=lm(), args=args, train_stream=stream)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="do not pass `train_dataset`"):
        TBPTTTrainer(model=lm(), args=args, train_stream=stream, train_dataset=[1, 2])


def test_the_entry_point_passes_trainer_callbacks_such_as_early_stopping(tmp_path):
    from transformers import EarlyStoppingCallback

    streams = {"train": token_stream(2000), "validation": token_stream(300, seed=5)}
    training = dict(
        num_train_epochs=20, per_device_train_batch_size=4, learning_rate=0.0, use_cpu=True, disable_tqdm=True
    )  # a learning rate of 0: validation never improves, so patience 2 stops after 3 epochs
    _, args, log = fit_language_model_tbptt(
        lm(), None, streams, training, tmp_path, TBPTTSettings(bptt=10), callbacks=[EarlyStoppingCallback(2)]
    )
    assert args.load_best_model_at_end and len([entry for entry in log if "eval_loss" in entry]) == 3


@pytest.mark.parametrize("engine", ["trainer", "accelerate"])
def test_the_entry_point_trains_evaluates_each_epoch_and_learns(tmp_path, engine):
    tokens = token_stream(3000)
    streams = {"train": tokens, "validation": token_stream(400, seed=5)}
    training = dict(
        num_train_epochs=3,
        per_device_train_batch_size=4,
        learning_rate=0.02,
        logging_steps=5,
        disable_tqdm=True,
        eval_strategy="epoch",
        **({"use_cpu": True} if engine == "trainer" else {}),
    )
    model = lm()
    before = stream_loss(model, EvaluationStream(streams["validation"], 4, 10))
    model, args, log = fit_language_model_tbptt(
        model,
        None,
        streams,
        training,
        tmp_path,
        TBPTTSettings(bptt=10, random_window_lengths=True, scale_lr_by_window_length=True),
        engine=engine,
        evaluation_batch_size=4,
    )
    evaluations = [entry for entry in log if "eval_loss" in entry and "train_runtime" not in entry]
    assert len(evaluations) >= 3
    after = stream_loss(model, EvaluationStream(streams["validation"], 4, 10))
    assert (after[0] / after[1]).item() < 0.8 * (before[0] / before[1]).item()  # it learnt the counting runs
    best = min(entry["eval_loss"] for entry in evaluations)
    assert (after[0] / after[1]).item() == pytest.approx(best, rel=1e-5)  # the best checkpoint is returned
    assert (tmp_path / "checkpoints").is_dir()


def test_a_resumed_trainer_run_starts_its_first_window_from_a_zero_state(tmp_path, caplog):
    tokens = token_stream(800)
    stream = TokenStream(tokens, bptt=5)

    def trainer(max_steps):
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            learning_rate=0.01,
            save_steps=3,
            save_strategy="steps",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        return TBPTTTrainer(model=lm(), args=args, train_stream=stream)

    trainer(3).train()
    resumed = trainer(6)
    with caplog.at_level(logging.INFO, logger="rnn_seq2seq_hf.tbptt"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed.state.global_step == 6
    assert "window 3 of epoch 0 starts from a zero state" in caplog.text
    assert resumed.carried.positions[0] == (0, 5)  # and carries again afterwards


# --- two processes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["loop", "trainer"])
def test_two_processes_each_reading_their_streams_train_like_one_process(tmp_path, engine):
    """torchrun + gloo: 2 processes x 1 stream x 2 accumulation steps = 1 process x 4 streams, same weights and
    losses (each process carries the states of its own streams)."""
    from test_distributed import run
    from test_distributed import weights as saved_weights

    run([f"tbptt-{engine}", str(tmp_path / "one"), "--global-batch", "4", "--steps", "6"])
    run([f"tbptt-{engine}", str(tmp_path / "two"), "--global-batch", "4", "--accumulation", "2", "--steps", "6"], 2)
    assert_same(saved_weights(tmp_path / "one"), saved_weights(tmp_path / "two"), tolerance=1e-5)
    one, two = (json.loads((tmp_path / name / "log.json").read_text()) for name in ("one", "two"))
    assert len(one) == 6 and two == pytest.approx(one, rel=1e-4)


def test_the_example_script_trains_from_a_recipe_and_reports_stateful_perplexity(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    words = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(6 + i % 5)) for i in range(300)]
    (tmp_path / "train.txt").write_text("\n".join(words[:240]) + "\n")
    (tmp_path / "valid.txt").write_text("\n".join(words[240:]) + "\n")
    recipe = {
        "task": "language_modeling",
        "tokenizer": {"kind": "word", "vocab_size": None},
        "model": {"embedding_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "variational_dropout": True},
        "training": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "optim": "sgd", "learning_rate": 1.0},
        "data": {"stateful": True, "block_size": 6, "random_window_lengths": True, "scale_lr_by_window_length": True},
        "evaluation": {"batch_size": 3, "block_size": 6},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    command = [
        sys.executable, str(root / "examples" / "train_lm_tbptt.py"), "--recipe", str(tmp_path / "recipe.yaml"),
        "--output-dir", str(tmp_path / "run"), "--train", str(tmp_path / "train.txt"),
        "--validation", str(tmp_path / "valid.txt"), "--set", "training.disable_tqdm=true",
        "--set", "training.use_cpu=true",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["validation_tokens"] > 0 and 1 < metrics["validation_perplexity"] < 60
    assert len(metrics["evaluations"]) == 1 and (tmp_path / "run" / "model" / "config.json").is_file()
