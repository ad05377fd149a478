"""The benchmark scripts measure what they claim: the bare loops are faithful floors (same tokens and logits as the
model's own forward and generate() on the same weights), the op counter counts what its docstring says, and the
peer and memory benchmarks degrade cleanly. No timing is asserted anywhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_common  # noqa: E402
import bench_overhead as overhead  # noqa: E402
from rnn_seq2seq_hf import RNNSeq2SeqForConditionalGeneration  # noqa: E402

SIZE = overhead.Size(hidden=16, embedding=16, vocab=30, batch=3, length=6, layers=2, beams=3)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def seq2seq():
    model = overhead.build_seq2seq(SIZE, CPU)
    source = torch.randint(3, SIZE.vocab, (SIZE.batch, SIZE.length), generator=torch.Generator().manual_seed(0))
    return model, source, torch.ones_like(source)


@pytest.fixture(scope="module")
def lm():
    model = overhead.build_lm(SIZE, CPU)
    prompt = torch.randint(3, SIZE.vocab, (SIZE.batch, SIZE.length), generator=torch.Generator().manual_seed(1))
    return model, prompt, torch.ones_like(prompt)


def generate(model, inputs, mask, steps, **kwargs):
    return model.generate(input_ids=inputs, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, **kwargs)


# --- op counting -------------------------------------------------------------------------------------------------


def test_count_ops_counts_only_top_level_aten_ops_and_host_reads():
    linear = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)

    def fn():
        y = torch.tanh(linear(x))  # aten::linear (addmm etc. inside it are not top level), aten::tanh
        return bool(y.sum() > 0)  # aten::sum, aten::gt, aten::is_nonzero (-> item -> _local_scalar_dense)

    count = bench_common.count_ops(fn)
    assert count.by_name == {"aten::linear": 1, "aten::tanh": 1, "aten::sum": 1, "aten::gt": 1, "aten::is_nonzero": 1}
    assert count.ops == 5 and count.syncs == 1
    assert bench_common.count_ops(fn).ops == 5  # deterministic
    # reads that copy values to the host without aten::_local_scalar_dense count too
    original = torch.Tensor.tolist
    reads = bench_common.count_ops(lambda: (x.tolist(), x.cpu(), x.numpy()))
    assert reads.syncs == 3 and torch.Tensor.tolist is original  # the methods are restored


def test_count_ops_sees_backward_and_optimizer_ops():
    linear = torch.nn.Linear(4, 3)
    step = bench_common.training_step_fn(linear, lambda: linear(torch.randn(2, 4)).sum())
    counts = bench_common.count_training_ops(step, lambda: linear(torch.randn(2, 4)).sum())
    # forward: randn, linear, sum; backward: at least the addmm and sum gradients; Adam: several ops per parameter
    assert counts["ops_forward_backward"] > 3
    assert counts["ops_optimizer_step"] >= 2 * 5


def test_view_ops_are_separated():
    x = torch.randn(4, 6)
    count = bench_common.count_ops(lambda: x.view(6, 4).transpose(0, 1).exp())
    assert count.ops == 3 and count.non_view_ops == 1


def test_per_step_is_the_marginal_cost_of_a_decode_step(seq2seq):
    """The bare greedy step is exactly the ten ops of the module docstring, whatever the number of steps."""
    model, source, _ = seq2seq
    long = bench_common.count_ops(lambda: overhead.bare_seq2seq_greedy(model, source, 6))
    short = bench_common.count_ops(lambda: overhead.bare_seq2seq_greedy(model, source, 3))
    assert bench_common.per_step(long, short, 3) == {
        "ops_per_step": 10.0,
        "non_view_ops_per_step": 10.0,
        "syncs_per_step": 0.0,
    }


# --- Seq2Seq bare loops ------------------------------------------------------------------------------------------


def test_prepared_model_is_sharp_and_never_picks_eos(seq2seq):
    model, source, mask = seq2seq
    with torch.no_grad():
        logits = model(input_ids=source, attention_mask=mask, decoder_input_ids=source).logits
    top2 = logits.softmax(-1).topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).mean() > 0.1  # peaked, not near-uniform
    assert (logits.argmax(-1) != model.config.eos_token_id).all()


def test_bare_seq2seq_greedy_matches_model_forward_and_generate(seq2seq):
    model, source, mask = seq2seq
    tokens, logits = overhead.bare_seq2seq_greedy(model, source, SIZE.length, return_logits=True)
    assert torch.equal(tokens, generate(model, source, mask, SIZE.length, do_sample=False))
    assert torch.equal(tokens, bench_common.handwritten_greedy(model, source, mask, SIZE.length))
    with torch.no_grad():  # teacher-forced forward of the model over the bare loop's own tokens
        reference = model(input_ids=source, attention_mask=mask, decoder_input_ids=tokens[:, :-1]).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_bare_seq2seq_beam_search_matches_generate(seq2seq):
    model, source, mask = seq2seq
    bare = overhead.bare_seq2seq_beam_search(model, source, SIZE.length, SIZE.beams)
    assert torch.equal(bare, generate(model, source, mask, SIZE.length, num_beams=SIZE.beams, do_sample=False))
    loop = bench_common.handwritten_beam_search(model, source, mask, SIZE.length, SIZE.beams)
    assert torch.equal(bare, loop.view(SIZE.batch, SIZE.beams, -1)[:, 0])
    assert not torch.equal(bare, overhead.bare_seq2seq_greedy(model, source, SIZE.length))  # a real search


def test_bare_seq2seq_sampling_matches_generate_from_the_same_seed(seq2seq):
    model, source, mask = seq2seq
    bare = overhead.seeded(lambda: overhead.bare_seq2seq_sample(model, source, SIZE.length))()
    sampled = overhead.seeded(lambda: generate(model, source, mask, SIZE.length, do_sample=True, top_k=0))()
    assert torch.equal(bare, sampled)
    assert not torch.equal(bare, overhead.bare_seq2seq_greedy(model, source, SIZE.length))


def test_bare_seq2seq_loops_refuse_other_architectures():
    config = overhead.seq2seq_config(SIZE, input_feeding=True)
    model = overhead.RNNSeq2SeqForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="benchmark's architecture"):
        overhead.bare_seq2seq_greedy(model, torch.ones(1, 2, dtype=torch.long) * 3, 2)


# --- LM bare loops -----------------------------------------------------------------------------------------------


def test_bare_lm_greedy_matches_model_forward_and_generate(lm):
    model, prompt, mask = lm
    tokens, logits = overhead.bare_lm_greedy(model, prompt, SIZE.length, return_logits=True)
    assert torch.equal(tokens, generate(model, prompt, mask, SIZE.length, do_sample=False))
    assert torch.equal(tokens, overhead.lm_forward_loop_greedy(model, prompt, SIZE.length))
    with torch.no_grad():
        reference = model(input_ids=tokens[:, :-1]).logits[:, SIZE.length - 1 :]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_bare_lm_beam_search_and_sampling_match_generate(lm):
    model, prompt, mask = lm
    bare = overhead.bare_lm_beam_search(model, prompt, SIZE.length, SIZE.beams)
    assert torch.equal(bare, generate(model, prompt, mask, SIZE.length, num_beams=SIZE.beams, do_sample=False))
    bare = overhead.seeded(lambda: overhead.bare_lm_sample(model, prompt, SIZE.length))()
    sampled = overhead.seeded(lambda: generate(model, prompt, mask, SIZE.length, do_sample=True, top_k=0))()
    assert torch.equal(bare, sampled)


# --- the tables ----------------------------------------------------------------------------------------------------


def test_decode_table_reports_ratios_against_the_bare_loop(seq2seq):
    model, source, mask = seq2seq
    variants = {
        "bare greedy": lambda n: overhead.bare_seq2seq_greedy(model, source, n),
        "generate() greedy": lambda n: generate(model, source, mask, n, do_sample=False),
    }
    table = overhead.decode_table(variants, {"generate() greedy": "bare greedy"}, 4, rounds=1, repeats=1, device=CPU)
    bare, ours = table["bare greedy"], table["generate() greedy"]
    assert bare["time_over_bare"] is None and ours["time_over_bare"] > 0
    assert bare["ops_per_step"] == 10.0
    assert ours["ops_per_token_over_bare"] == ours["ops_per_token"] / bare["ops_per_token"]
    assert ours["ops_per_step"] > bare["ops_per_step"]


def test_training_table_counts_every_variant():
    table = overhead.seq2seq_training(SIZE, CPU, rounds=1, repeats=1)
    assert set(table) == {"bound B", "bare fused", "fused", "input feeding", "input feeding, fused-op steps"}
    assert table["bound B"]["of_bound_b"] == 1.0 and table["bound B"]["ops_over_bound_b"] == 1.0
    # the input-feeding decoder issues its step ops once per target position
    assert table["input feeding"]["ops_forward_backward"] > 2 * table["fused"]["ops_forward_backward"]


def test_bare_fused_loss_is_the_models_training_loss_with_the_same_gradients():
    torch.manual_seed(0)
    model = RNNSeq2SeqForConditionalGeneration(overhead.seq2seq_config(SIZE)).train()
    generator = torch.Generator().manual_seed(2)
    source = torch.randint(3, SIZE.vocab, (SIZE.batch, SIZE.length), generator=generator)
    labels = torch.randint(3, SIZE.vocab, (SIZE.batch, SIZE.length - 3), generator=generator)
    decoder_input_ids = torch.cat([torch.ones_like(labels[:, :1]), labels[:, :-1]], dim=1)
    assert model.config.decoder_start_token_id == 1
    ours = model(input_ids=source, labels=labels).loss
    ours_grads = torch.autograd.grad(ours, list(model.parameters()))
    bare = overhead.bare_seq2seq_loss(model, source, decoder_input_ids, labels)
    bare_grads = torch.autograd.grad(bare, list(model.parameters()))
    torch.testing.assert_close(bare, ours, rtol=1e-6, atol=1e-6)
    for got, expected in zip(bare_grads, ours_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_write_json_replaces_the_file_whole(tmp_path):
    path = bench_common.write_json(tmp_path / "out" / "r.json", {"a": 1})
    assert path.read_text().startswith("{") and not list(path.parent.glob(".*.tmp"))


# --- peers -------------------------------------------------------------------------------------------------------


def test_peers_benchmark_skips_what_is_not_installed_and_runs_ours():
    import importlib.util

    import bench_peers

    size = bench_peers.Size(hidden=16, embedding=16, vocab=30, batch=2, length=4, layers=2, beams=2)
    toolkits, skipped = bench_peers.build_toolkits(size, CPU, ["OpenNMT-py", "Joey NMT"])
    installed = {"OpenNMT-py": importlib.util.find_spec("onmt"), "Joey NMT": importlib.util.find_spec("joeynmt")}
    for name, spec in installed.items():
        if spec is None:
            assert skipped[name].startswith("not importable")
    ours = toolkits[0]
    assert ours.name == "ours"
    batch = bench_peers.Batch(
        source=torch.full((2, 4), 5), labels=torch.full((2, 4), 6), decoder_input_ids=torch.full((2, 4), 2)
    )
    for feeding in (False, True):
        bench_peers.training_step(ours, feeding, batch)()
    assert ours.decode(batch, 4, 1).shape == (2, 5)
    assert ours.decode(batch, 4, 2).shape == (2, 5)
    _, skipped = bench_peers.build_toolkits(size, CPU, [])
    assert skipped == {"OpenNMT-py": "not asked for (--peers)", "Joey NMT": "not asked for (--peers)"}


# --- memory ------------------------------------------------------------------------------------------------------

MEMORY_ARGS = ["--batch-size", "2", "--lm-length", "30", "--source-length", "5", "--target-length", "20"]
MEMORY_ARGS += ["--hidden-size", "8", "--embedding-size", "8", "--vocab-size", "20", "--repeats", "1"]


def in_process(bench_memory):
    """`measure` without the fresh process (which costs seconds of imports)."""
    return lambda variant, checkpointing, args, argv: bench_memory.run_one(variant, checkpointing, args)


@pytest.mark.slow
def test_memory_worker_runs_in_a_fresh_process():
    import bench_memory

    args = bench_memory.parse_args(MEMORY_ARGS)
    row = bench_memory.measure("lm", False, args, MEMORY_ARGS)
    assert row["variant"] == "lm" and row["length"] == 30 and row["in_use_before_mib"] > 0


@pytest.mark.parametrize("variant", ["lm", "seq2seq-fused", "seq2seq-input-feeding"])
def test_memory_run_measures_one_training_step(variant):
    import bench_memory

    row = bench_memory.run_one(variant, False, bench_memory.parse_args(MEMORY_ARGS))
    assert row["length"] == (30 if variant == "lm" else 20)
    assert row["loss"] > 0 and row["grad_norm"] > 0  # (memory: too small to see in a shared process)


def test_memory_benchmark_says_when_checkpointing_is_unsupported(tmp_path, capsys, monkeypatch):
    import bench_memory

    monkeypatch.setattr(bench_memory, "supports_checkpointing", lambda variant: False)
    monkeypatch.setattr(bench_memory, "measure", in_process(bench_memory))
    output = tmp_path / "memory.json"
    bench_memory.main([*MEMORY_ARGS, "--variants", "lm", "--output", str(output)])
    assert "does not support gradient checkpointing yet" in capsys.readouterr().out
    assert set(json.loads(output.read_text())["runs"]["lm"]) == {"plain"}


def test_memory_worker_arguments_leave_out_the_output():
    import bench_memory

    argv = ["--output", "x.json", "--variants=lm", "--batch-size", "2", "--output=y"]
    assert bench_memory.strip_output_args(argv) == ["--batch-size", "2"]


def test_memory_benchmark_compares_checkpointed_runs(tmp_path, monkeypatch):
    """The checkpointed branch, exercised in-process with a model that only claims support: same loss and
    gradient norm, a saved fraction computed (whatever its value here)."""
    import bench_memory

    built = bench_memory.build

    def build_claiming_support(variant, args, device):
        model, loss, length = built(variant, args, device)
        model.model.gradient_checkpointing = False  # the flag transformers switches on
        return model, loss, length

    monkeypatch.setattr(bench_memory.RNNLMForCausalLM, "supports_gradient_checkpointing", True)
    monkeypatch.setattr(bench_memory, "build", build_claiming_support)
    monkeypatch.setattr(bench_memory, "measure", in_process(bench_memory))
    output = tmp_path / "memory.json"
    bench_memory.main([*MEMORY_ARGS, "--variants", "lm", "--output", str(output)])
    rows = json.loads(output.read_text())["runs"]["lm"]
    assert rows["checkpointed"]["gradient_checkpointing"] is True
    assert rows["same_loss_and_gradient_norm"] is True
    assert "memory_saved_fraction" in rows
