"""save_pretrained / from_pretrained through the Auto classes, and loading with trust_remote_code in a process that
cannot import rnn_seq2seq_hf."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from helpers import make_lm, make_seq2seq, random_tokens, right_padded
from rnn_seq2seq_hf import RNNLMConfig, RNNLMModel, RNNSeq2SeqConfig, RNNSeq2SeqModel

SEQ2SEQ_CASES = {
    "plain": dict(),
    "tied-shared": dict(tie_word_embeddings=True, share_embeddings=True),
    "shared-only": dict(share_embeddings=True),
    "tied-only": dict(tie_word_embeddings=True, embedding_size=16),
    "bahdanau-gru-linear": dict(attention_type="bahdanau", cell_type="gru", bridge="linear", input_feeding=True),
}


def seq2seq_inputs():
    source, mask = right_padded([[5, 6, 7, 8], [9, 10]])
    return dict(input_ids=source, attention_mask=mask, decoder_input_ids=torch.tensor([[1, 4, 5], [1, 6, 7]]))


def saved_files(path):
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("case", SEQ2SEQ_CASES)
def test_seq2seq_save_then_auto_load_gives_identical_outputs(tmp_path, case):
    model = make_seq2seq(**SEQ2SEQ_CASES[case])
    model.save_pretrained(tmp_path)
    files = saved_files(tmp_path)
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "rnn_seq2seq"

    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    inputs = seq2seq_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
        source = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=6)
        greedy = model.generate(**source, num_beams=3)
        again = loaded.generate(**source, num_beams=3)
    assert torch.equal(greedy, again)
    for name, parameter in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], parameter, atol=0, rtol=0)
    if SEQ2SEQ_CASES[case].get("tie_word_embeddings"):
        assert loaded.lm_head.linear.weight is loaded.model.decoder.embed_tokens.weight
    if SEQ2SEQ_CASES[case].get("share_embeddings"):
        assert loaded.model.encoder.embed_tokens.weight is loaded.model.decoder.embed_tokens.weight


@pytest.mark.parametrize("overrides", [dict(), dict(tie_word_embeddings=True, input_to_output=True, cell_type="gru")])
def test_lm_save_then_auto_load_gives_identical_outputs(tmp_path, overrides):
    model = make_lm(**overrides)
    model.save_pretrained(tmp_path)
    assert "model.safetensors" in saved_files(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_tokens(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_auto_config_and_auto_model_build_both_families(tmp_path):
    for config in (RNNLMConfig(vocab_size=30, hidden_size=8, embedding_size=8), RNNSeq2SeqConfig(vocab_size=30)):
        config.save_pretrained(tmp_path / config.model_type)
        reloaded = AutoConfig.from_pretrained(tmp_path / config.model_type)
        assert type(reloaded) is type(config)
        assert reloaded.to_diff_dict() == config.to_diff_dict()
    assert isinstance(AutoModel.from_config(RNNLMConfig(vocab_size=30)), RNNLMModel)
    assert isinstance(AutoModel.from_config(RNNSeq2SeqConfig(vocab_size=30)), RNNSeq2SeqModel)
    assert isinstance(AutoModelForCausalLM.from_config(RNNLMConfig(vocab_size=30)), torch.nn.Module)


# Runs in a fresh interpreter that cannot import rnn_seq2seq_hf: the modeling code must come from the folder.
REMOTE_LOADER = textwrap.dedent(
    """
    import importlib.abc, json, sys
    import torch

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "rnn_seq2seq_hf":
                raise ImportError("rnn_seq2seq_hf is blocked in this test")
    sys.meta_path.insert(0, Block())
    try:
        import rnn_seq2seq_hf  # noqa: F401
        raise SystemExit("the library should not be importable here")
    except ImportError:
        pass

    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    folder, kind, inputs_file, out_file = sys.argv[1:]
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = torch.load(inputs_file)
    with torch.no_grad():
        logits = model(**inputs).logits
        gen_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        generated = model.generate(**gen_inputs, num_beams=3, max_new_tokens=5)
    torch.save({"logits": logits, "generated": generated, "module": type(model).__module__}, out_file)
    """
)


@pytest.mark.parametrize("kind", ["seq2seq", "lm"])
def test_folder_saved_for_auto_class_loads_with_trust_remote_code_without_the_library(tmp_path, kind):
    if kind == "seq2seq":
        model = make_seq2seq(tie_word_embeddings=True, share_embeddings=True, attention_type="concat")
        model.config.register_for_auto_class()
        model.register_for_auto_class("AutoModelForSeq2SeqLM")
        inputs = seq2seq_inputs()
    else:
        model = make_lm(tie_word_embeddings=True)
        model.config.register_for_auto_class()
        model.register_for_auto_class("AutoModelForCausalLM")
        inputs = dict(input_ids=random_tokens(2, 5))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" in config and any(name.startswith("modeling_") for name in saved_files(folder))

    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(REMOTE_LOADER)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), kind, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules.")
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(**inputs).logits, atol=0, rtol=0)
        gen_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        assert torch.equal(remote["generated"], model.generate(**gen_inputs, num_beams=3, max_new_tokens=5))


# --- damaged, hand-edited and unsafe checkpoints ---------------------------------------------------------------------


def saved_seq2seq(tmp_path):
    model = make_seq2seq()
    model.save_pretrained(tmp_path)
    model.generation_config.save_pretrained(tmp_path)
    return model


def test_a_folder_with_only_pickled_weights_is_refused_with_a_clear_message(tmp_path):
    model = saved_seq2seq(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(
        OSError, match=r"no safetensors weights \(only \['pytorch_model.bin'\]\).*loads safetensors only"
    ):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`use_safetensors` must be True"):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path, use_safetensors=False)


def test_a_missing_tensor_is_an_error_naming_the_file_and_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    saved_seq2seq(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.decoder.attention.memory_projection.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors.*missing tensors.*memory_projection.weight"):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path)


def test_a_config_that_no_longer_matches_the_weights_is_an_error(tmp_path):
    saved_seq2seq(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["attention_type"] = "bahdanau"  # the weights are those of general attention
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not match config.json"):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    config["attention_type"], config["hidden_size"] = "general", 32  # another size
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, RuntimeError), match=r"(do not match config.json|size mismatch)"):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [("{not json", "Expecting property name"), ('{"num_beams": 0}', "num_beams"), ("[1, 2]", "JSON object")],
)
def test_a_broken_generation_config_is_an_error_naming_the_file(tmp_path, content, reason):
    saved_seq2seq(tmp_path)
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(ValueError, match=rf"generation_config.json: not a valid generation config \(.*{reason}"):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path)


def test_keys_absent_from_an_older_config_take_their_defaults(tmp_path):
    model = saved_seq2seq(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["input_feeding"], config["use_cache"]  # written by older versions? defaults apply
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**seq2seq_inputs()).logits, model(**seq2seq_inputs()).logits)


# --- one-line errors for bad model inputs ----------------------------------------------------------------------------


def test_token_ids_of_other_integer_types_are_converted():
    model = make_seq2seq()
    inputs = seq2seq_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
        for dtype in (torch.int32, torch.int16, torch.uint8):
            converted = {k: v.to(dtype) if "input_ids" in k else v for k, v in inputs.items()}
            torch.testing.assert_close(model(**converted).logits, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(labels=torch.zeros(2, 0, dtype=torch.long)), r"`labels` is empty \(shape \(2, 0\)\)"),
        (dict(labels=torch.zeros(2, 3)), r"`labels` must hold integer token ids"),
        (dict(inputs_embeds=[[0.0] * 12]), r"`inputs_embeds` must be a torch tensor"),
        (
            dict(decoder_inputs_embeds=torch.zeros(2, 3, 5)),
            r"`decoder_inputs_embeds` must have shape \[batch, length, 12\]",
        ),
        (dict(encoder_outputs="cached"), r"`encoder_outputs` must be what `model.get_encoder\(\)` returns"),
        (
            dict(encoder_outputs=(torch.zeros(2, 4, 8),)),
            r"`encoder_outputs.last_hidden_state` must be a tensor \[batch, source length, 16\]",
        ),
        (
            dict(encoder_outputs=(torch.zeros(2, 4, 16),)),
            r"`encoder_outputs.final_hidden_state` must be a tensor of shape \(2, 2, 16\)",
        ),
        (
            dict(encoder_outputs={"last_hidden_state": torch.zeros(2, 4, 16), "pooled": 1}),
            r"unknown fields \['pooled'\]",
        ),
    ],
)
def test_bad_model_inputs_are_one_line_errors_naming_the_argument(kwargs, message):
    model = make_seq2seq()
    inputs = {"input_ids": random_tokens(2, 4), "decoder_input_ids": random_tokens(2, 3), **kwargs}
    if "inputs_embeds" in kwargs:
        inputs.pop("input_ids")
    if "decoder_inputs_embeds" in kwargs:
        inputs.pop("decoder_input_ids")
    if "labels" in kwargs:
        inputs.pop("decoder_input_ids")
    with pytest.raises(ValueError, match=message) as error:
        model(**inputs)
    assert "\n" not in str(error.value)
