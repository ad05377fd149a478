"""The mixed-precision policy: under autocast the recurrent layers run in their weights' dtype (fp32), the
projections around them in the autocast dtype. Checked on the CPU with bf16 autocast (cuDNN's fp16 cast of LSTM/GRU
under bf16 autocast, which the policy prevents, only exists on a GPU)."""

import pytest
import torch

from helpers import LOGIT_TOL, make_lm, make_seq2seq, random_tokens, right_padded
from rnn_seq2seq_hf.models.recurrent import RecurrentStack

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_recurrent_stack_runs_in_fp32_under_autocast(cell):
    """Bare torch differs by cell and device under autocast: on this CPU nn.LSTM has no bf16 kernel and raises,
    nn.GRU stays fp32; on a GPU, cuDNN LSTM/GRU run in fp16. The stack always runs its weights' dtype."""
    stack = RecurrentStack(cell, 6, 8, 2)
    inputs = torch.randn(3, 5, 6)
    with torch.autocast(**AUTOCAST):
        outputs, state, _ = stack(inputs)
    assert outputs.dtype == torch.float32 and all(s.dtype == torch.float32 for s in state)
    torch.testing.assert_close(outputs, stack(inputs)[0])  # identical to the fp32 run


@pytest.mark.parametrize(("attention", "feeding"), [("general", False), ("bahdanau", True), ("concat", False)])
def test_seq2seq_under_bf16_autocast_matches_fp32_and_trains(attention, feeding):
    model = make_seq2seq(attention_type=attention, input_feeding=feeding).train()
    source, mask = right_padded([[5, 6, 7, 8, 9], [10, 11]])
    labels = random_tokens(2, 4)
    reference = model(input_ids=source, attention_mask=mask, labels=labels)
    with torch.autocast(**AUTOCAST):
        out = model(input_ids=source, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert out.encoder_last_hidden_state.dtype == torch.float32  # the recurrence stayed in fp32
    assert out.logits.dtype == torch.bfloat16  # the vocabulary projection ran in bf16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(reference.loss.item(), rel=2e-2)
    out.loss.backward()
    rnn_grad = model.model.decoder.rnn.rnn.weight_hh_l0.grad
    assert rnn_grad.dtype == torch.float32 and torch.isfinite(rnn_grad).all()


def test_fused_and_step_paths_agree_under_autocast():
    model = make_seq2seq(attention_type="dot")
    source, mask = right_padded([[5, 6, 7, 8, 9], [10, 11]])
    labels = random_tokens(2, 4)
    results = []
    for fused in (True, False):
        model.model.decoder.use_fused = fused
        with torch.no_grad(), torch.autocast(**AUTOCAST):
            results.append(model(input_ids=source, attention_mask=mask, labels=labels).logits.float())
    torch.testing.assert_close(results[0], results[1], atol=5e-2, rtol=2e-2)


def test_lm_generation_under_autocast_and_a_model_cast_to_bf16():
    model = make_lm(cell_type="gru")
    ids = random_tokens(2, 5)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with torch.autocast(**AUTOCAST):
            autocast_logits = model(input_ids=ids).logits.float()
            generated = model.generate(input_ids=ids, max_new_tokens=4, num_beams=2)
        assert generated.shape == (2, 9)
        torch.testing.assert_close(autocast_logits, reference, atol=0.15, rtol=0.05)
        cast = make_lm(cell_type="gru").to(torch.bfloat16)
        cast_logits = cast(input_ids=ids).logits
    assert cast_logits.dtype == torch.bfloat16
    torch.testing.assert_close(cast_logits.float(), reference, atol=0.3, rtol=0.1)
    assert LOGIT_TOL  # (the exact-agreement tolerance does not apply to bf16)


def test_trainer_with_bf16_on_cpu_lowers_the_loss(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from test_trainer import copy_task, pad_batch, seq2seq_model

    trainer = Seq2SeqTrainer(
        model=seq2seq_model(),
        args=Seq2SeqTrainingArguments(
            output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=40, per_device_train_batch_size=16,
            learning_rate=1e-2, logging_steps=10, report_to="none", save_strategy="no", disable_tqdm=True,
        ),
        train_dataset=copy_task(256, seed=0),
        data_collator=pad_batch,
    )  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert trainer.model.model.decoder.rnn.rnn.weight_ih_l0.dtype == torch.float32
