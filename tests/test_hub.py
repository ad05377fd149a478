"""Sharing on the Hub, against the local Hub look-alike in `hub_server.py`.

One process with the library pushes (`push_to_hub` from Python, `rnn-seq2seq push`, `Trainer(push_to_hub=True)`,
`--push-to-hub` after training) and records reference outputs; a second process that cannot import the library
loads every repository with `trust_remote_code=True` (models, tokenizers, pipelines); a third, with the library,
loads without `trust_remote_code`. Outputs must be identical.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hub_server import USER, HubServer

TESTS = Path(__file__).resolve().parent

PUBLISH = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from helpers import make_lm, make_seq2seq
    from test_trainer import copy_task, pad_batch
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
    from rnn_seq2seq_hf.cli import main
    from rnn_seq2seq_hf.tokenization import train_tokenizer
    from rnn_seq2seq_hf.training import save_model_folder

    out = sys.argv[1]
    tokenizer = train_tokenizer(["a b c d e f g h i j k l m n o p q r s"], kind="word", vocab_size=None)
    lm_tokenizer = train_tokenizer(["a b c d e f g h i j k l m n o p q r s"], kind="word", vocab_size=None,
                                   padding_side="left", add_eos=False)
    sources = ["a b c d", "e f", "g h i j k l"]
    prompts = ["a b", "c d e f"]
    reference = {}

    # 1. push_to_hub from Python: model and tokenizer
    seq2seq = make_seq2seq(attention_type="bahdanau", input_feeding=True, tie_word_embeddings=True,
                           share_embeddings=True, embedding_size=16)
    seq2seq.push_to_hub("%(user)s/python-s2s")
    tokenizer.push_to_hub("%(user)s/python-s2s")
    encoded = tokenizer(sources, return_tensors="pt", padding=True)
    reference["python-s2s"] = {
        "generate": seq2seq.generate(**encoded, num_beams=3, max_new_tokens=6).tolist(),
        "logits": seq2seq(**encoded, decoder_input_ids=torch.ones(3, 2, dtype=torch.long)).logits.tolist(),
    }
    lm = make_lm(cell_type="gru", tie_word_embeddings=True)
    lm.push_to_hub("%(user)s/python-lm")
    lm_tokenizer.push_to_hub("%(user)s/python-lm")
    lm_inputs = lm_tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    reference["python-lm"] = {"generate": lm.generate(**lm_inputs, max_new_tokens=5, num_beams=2).tolist()}

    # 2. the CLI pushes a folder written by training (model card and figures included)
    folder = save_model_folder(make_seq2seq(seed=4), tokenizer, out + "/cli-model")
    (folder / "README.md").write_text("---\\nlicense: apache-2.0\\nlibrary_name: transformers\\n---\\n# card\\n")
    assert main(["push", "--model", str(folder), "--repo-id", "%(user)s/cli-s2s"]) == 0

    # 3. rnn-seq2seq train-translation --push-to-hub
    from pathlib import Path
    from test_cli import PAIRS, TINY_TRANSLATION_RECIPE
    data = Path(out) / "data"
    data.mkdir()
    (data / "pairs.tsv").write_text("".join(f"{s}\\t{t}\\n" for s, t in PAIRS))
    (data / "recipe.yaml").write_text(TINY_TRANSLATION_RECIPE)
    assert main(["train-translation", "--recipe", str(data / "recipe.yaml"), "--output-dir", out + "/trained",
                 "--train", str(data / "pairs.tsv"), "--validation", str(data / "pairs.tsv"),
                 "--push-to-hub", "%(user)s/trained-s2s"]) == 0

    # 4. Trainer(push_to_hub=True)
    torch.manual_seed(0)
    trainer_model = make_seq2seq(seed=5)
    args = Seq2SeqTrainingArguments(output_dir=out + "/trainer", max_steps=3, per_device_train_batch_size=4,
        report_to="none", use_cpu=True, push_to_hub=True, hub_model_id="%(user)s/trainer-s2s", hub_strategy="end",
        save_strategy="no", disable_tqdm=True)
    trainer = Seq2SeqTrainer(model=trainer_model, args=args, train_dataset=copy_task(16, seed=0),
                             data_collator=pad_batch, processing_class=tokenizer)
    trainer.train()
    trainer.push_to_hub()
    trainer_model.eval()
    reference["trainer-s2s"] = {"generate": trainer_model.generate(**encoded, num_beams=2, max_new_tokens=6).tolist()}

    json.dump(reference, open(out + "/reference.json", "w"))
    """
)

LOAD_WITHOUT_LIBRARY = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "rnn_seq2seq_hf":
                raise ImportError("rnn_seq2seq_hf is blocked in this process")
    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

    out = sys.argv[1]
    sources = ["a b c d", "e f", "g h i j k l"]
    prompts = ["a b", "c d e f"]
    loaded = {}

    tokenizer = AutoTokenizer.from_pretrained("%(user)s/python-s2s", trust_remote_code=True)
    model = AutoModelForSeq2SeqLM.from_pretrained("%(user)s/python-s2s", trust_remote_code=True).eval()
    encoded = tokenizer(sources, return_tensors="pt", padding=True)
    loaded["python-s2s"] = {
        "module": type(model).__module__,
        "generate": model.generate(**encoded, num_beams=3, max_new_tokens=6).tolist(),
        "logits": model(**encoded, decoder_input_ids=torch.ones(3, 2, dtype=torch.long)).logits.tolist(),
        "pipeline": pipeline("seq2seq-generation", model="%(user)s/python-s2s", trust_remote_code=True)(
            sources, num_beams=3, max_new_tokens=6, batch_size=2),
    }
    lm_tokenizer = AutoTokenizer.from_pretrained("%(user)s/python-lm", trust_remote_code=True)
    lm = AutoModelForCausalLM.from_pretrained("%(user)s/python-lm", trust_remote_code=True).eval()
    lm_inputs = lm_tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    generator = pipeline("text-generation", model="%(user)s/python-lm", trust_remote_code=True)
    loaded["python-lm"] = {
        "module": type(lm).__module__,
        "generate": lm.generate(**lm_inputs, max_new_tokens=5, num_beams=2).tolist(),
        "pipeline": generator(prompts, max_new_tokens=5, num_beams=2, do_sample=False, batch_size=2),
    }
    cli = AutoModelForSeq2SeqLM.from_pretrained("%(user)s/cli-s2s", trust_remote_code=True)
    loaded["cli-s2s"] = {"module": type(cli).__module__}
    trained = AutoModelForSeq2SeqLM.from_pretrained("%(user)s/trained-s2s", trust_remote_code=True)
    trained_tokenizer = AutoTokenizer.from_pretrained("%(user)s/trained-s2s", trust_remote_code=True)
    trained_output = trained.generate(**trained_tokenizer(["ein hund läuft"], return_tensors="pt"))
    loaded["trained-s2s"] = {"module": type(trained).__module__,
                             "output": trained_tokenizer.decode(trained_output[0], skip_special_tokens=True)}
    trainer_model = AutoModelForSeq2SeqLM.from_pretrained("%(user)s/trainer-s2s", trust_remote_code=True).eval()
    loaded["trainer-s2s"] = {
        "module": type(trainer_model).__module__,
        "generate": trainer_model.generate(**encoded, num_beams=2, max_new_tokens=6).tolist(),
    }
    json.dump(loaded, open(out + "/without_library.json", "w"))
    """
)

LOAD_WITH_LIBRARY = textwrap.dedent(
    """
    import json, sys
    import rnn_seq2seq_hf
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline
    out = sys.argv[1]
    model = AutoModelForSeq2SeqLM.from_pretrained("%(user)s/python-s2s")  # no trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained("%(user)s/python-s2s")
    encoded = tokenizer(["a b c d", "e f", "g h i j k l"], return_tensors="pt", padding=True)
    generated = model.generate(**encoded, num_beams=3, max_new_tokens=6)

    # the command line finds the Hub id with one request and loads it the same way
    from rnn_seq2seq_hf.cli import main
    open(out + "/cli_input.txt", "w").write("a b c d\\ne f\\ng h i j k l\\n")
    assert main(["translate", "--model", "%(user)s/python-s2s", "--input", out + "/cli_input.txt",
                 "--output", out + "/cli_output.txt", "--num-beams", "3", "--max-new-tokens", "6"]) == 0
    json.dump({"module": type(model).__module__, "generate": generated.tolist(),
               "decoded": [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)],
               "cli": open(out + "/cli_output.txt").read().splitlines()},
              open(out + "/with_library.json", "w"))
    """
)


def run(script: str, hub, tmp: Path, name: str) -> None:
    path = tmp / f"{name}.py"
    path.write_text(script % {"user": USER})
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": "test-token",
        "HF_HOME": str(tmp / f"hf_home_{name}"),
        "HF_MODULES_CACHE": str(tmp / f"hf_home_{name}" / "modules"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
    }
    result = subprocess.run(
        [sys.executable, str(path), str(tmp), str(TESTS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def hub_round_trip(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    with HubServer() as hub:
        run(PUBLISH, hub, tmp, "publish")
        run(LOAD_WITHOUT_LIBRARY, hub, tmp, "without_library")
        run(LOAD_WITH_LIBRARY, hub, tmp, "with_library")
        files = {repo_id: dict(repo.files) for repo_id, repo in hub.repos.items()}
    reference = json.loads((tmp / "reference.json").read_text())
    without = json.loads((tmp / "without_library.json").read_text())
    with_library = json.loads((tmp / "with_library.json").read_text())
    return reference, without, with_library, files


def test_python_push_loads_without_the_library_with_identical_outputs(hub_round_trip):
    reference, without, _, files = hub_round_trip
    pushed = files[f"{USER}/python-s2s"]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= pushed.keys()
    assert {"modeling_rnn_seq2seq.py", "configuration_rnn_seq2seq.py", "pipeline_seq2seq.py"} <= pushed.keys()
    assert not any(name.endswith(".bin") for name in pushed)
    config = json.loads(pushed["config.json"])
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_rnn_seq2seq.RNNSeq2SeqForConditionalGeneration"
    assert "seq2seq-generation" in config["custom_pipelines"]
    for name in ("python-s2s", "python-lm", "trainer-s2s", "cli-s2s", "trained-s2s"):
        assert without[name]["module"].startswith("transformers_modules."), name
    for name in ("python-s2s", "python-lm", "trainer-s2s"):
        assert without[name]["generate"] == reference[name]["generate"], name
    torch.testing.assert_close(
        torch.tensor(without["python-s2s"]["logits"]), torch.tensor(reference["python-s2s"]["logits"]), atol=0, rtol=0
    )


def test_with_the_library_the_hub_model_loads_without_trust_remote_code_also_in_the_cli(hub_round_trip):
    reference, _, with_library, _ = hub_round_trip
    assert with_library["module"].startswith("rnn_seq2seq_hf.")
    assert with_library["generate"] == reference["python-s2s"]["generate"]
    assert with_library["cli"] == with_library["decoded"]  # rnn-seq2seq translate --model OWNER/NAME


def test_pipelines_load_from_the_hub_without_the_library(hub_round_trip):
    reference, without, _, _ = hub_round_trip
    texts = [output[0]["generated_text"] for output in without["python-s2s"]["pipeline"]]
    assert len(texts) == 3 and all(isinstance(text, str) for text in texts)
    lm_texts = [output[0]["generated_text"] for output in without["python-lm"]["pipeline"]]
    assert lm_texts[0].startswith("a b") and lm_texts[1].startswith("c d e f")


def test_cli_push_uploads_the_whole_folder_and_the_card_parses(hub_round_trip, tmp_path):
    _, _, _, files = hub_round_trip
    pushed = files[f"{USER}/cli-s2s"]
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "modeling_rnn_seq2seq.py",
    } <= pushed.keys()
    (tmp_path / "README.md").write_bytes(pushed["README.md"])
    assert ModelCard.load(tmp_path / "README.md").data.license == "apache-2.0"


def test_push_after_training_uploads_the_model_card_with_its_metrics(hub_round_trip, tmp_path):
    _, without, _, files = hub_round_trip
    pushed = files[f"{USER}/trained-s2s"]
    assert {"README.md", "attention.png", "loss.png", "tokenizer.json", "model.safetensors"} <= pushed.keys()
    (tmp_path / "README.md").write_bytes(pushed["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert {result.metric_type for result in card.data.eval_results} == {
        "bleu",
        "bleu_lowercase",
        "chrf",
        "exact_match",
    }
    assert isinstance(without["trained-s2s"]["output"], str)


def test_trainer_push_to_hub_pushes_model_and_tokenizer(hub_round_trip):
    _, _, _, files = hub_round_trip
    pushed = files[f"{USER}/trainer-s2s"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "modeling_rnn_seq2seq.py"} <= pushed.keys()
