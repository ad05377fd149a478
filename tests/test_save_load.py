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
