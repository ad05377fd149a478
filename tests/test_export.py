"""torch.export and ONNX export of the pieces a serving runtime calls: the LM step, the Seq2Seq encoder and one
decoder step. The exported programs (and onnxruntime running the ONNX files) give the outputs of the PyTorch model,
on inputs other than the ones they were traced on, padding included."""

import pytest
import torch

from helpers import make_lm, make_seq2seq, random_tokens
from rnn_seq2seq_hf.export import EncoderForExport, export_onnx, export_programs

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [dict(cell_type="lstm", input_to_output=True), dict(cell_type="gru")])
def test_exported_lm_step_continues_like_the_model(overrides):
    model = make_lm(**overrides)
    programs = export_programs(model, length=1)
    step = programs["lm_step"].module()
    tokens = random_tokens(4, 6, seed=3)  # another batch size than the traced one
    state = tuple(torch.zeros(2, 4, 16) for _ in programs["lm_step_inputs"][1:])
    logits = []
    for t in range(tokens.shape[1]):
        out, *state = step(tokens[:, t : t + 1], *state)
        logits.append(out)
    with torch.no_grad():
        reference = model(input_ids=tokens).logits
    torch.testing.assert_close(torch.cat(logits, dim=1), reference, **TOL)


@pytest.mark.parametrize(
    "overrides",
    [dict(attention_type="general"), dict(cell_type="gru", attention_type="bahdanau", input_feeding=True)],
)
def test_exported_encoder_and_decoder_step_decode_like_the_model(overrides):
    model = make_seq2seq(**overrides)
    programs = export_programs(model, source_length=5)
    encoder, step = programs["encoder"].module(), programs["decoder_step"].module()
    source = random_tokens(3, 5, seed=4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])  # right and left padding
    decoder_inputs = torch.cat([torch.ones(3, 1, dtype=torch.long), random_tokens(3, 3, seed=5)], dim=1)
    memory, keys, *state = encoder(source, mask)
    logits = []
    for t in range(decoder_inputs.shape[1]):
        out, *state = step(decoder_inputs[:, t : t + 1], memory, keys, mask, *state)
        logits.append(out)
    with torch.no_grad():
        reference = model(input_ids=source, attention_mask=mask, decoder_input_ids=decoder_inputs).logits
    torch.testing.assert_close(torch.stack(logits, dim=1), reference, **TOL)


def test_onnx_export_runs_in_onnxruntime_with_the_same_outputs(tmp_path):
    import onnxruntime as ort

    # one layer and a short source keep the export quick: the ONNX files are the programs tested above, translated
    model = make_seq2seq(attention_type="general", encoder_layers=1, decoder_layers=1)
    paths = export_onnx(model, tmp_path / "s2s", source_length=3)
    encoder = ort.InferenceSession(str(paths["encoder"]))
    step = ort.InferenceSession(str(paths["decoder_step"]))
    source, mask = random_tokens(2, 3, seed=6), torch.tensor([[1, 1, 1], [1, 1, 0]])
    encoded = encoder.run(None, {"input_ids": source.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        for got, expected in zip(encoded, EncoderForExport(model)(source, mask), strict=True):
            torch.testing.assert_close(torch.from_numpy(got), expected, **TOL)
        start = torch.ones(2, 1, dtype=torch.long)
        names = [node.name for node in step.get_inputs()]
        values = [start.numpy(), encoded[0], encoded[1], mask.numpy(), *encoded[2:]]
        logits, *_ = step.run(None, dict(zip(names, values, strict=True)))
        reference = model(input_ids=source, attention_mask=mask, decoder_input_ids=start).logits[:, 0]
    torch.testing.assert_close(torch.from_numpy(logits), reference, **TOL)

    lm = make_lm(num_hidden_layers=1)
    lm_step = ort.InferenceSession(str(export_onnx(lm, tmp_path / "lm")["lm_step"]))
    tokens = random_tokens(2, 1, seed=7)
    zeros = torch.zeros(1, 2, 16).numpy()
    logits, *_ = lm_step.run(None, {"input_ids": tokens.numpy(), "h": zeros, "c": zeros})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), lm(input_ids=tokens).logits, **TOL)
