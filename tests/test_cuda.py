"""The same models on a CUDA GPU (cuDNN) against the CPU reference: outputs and gradients of every variant, the
fused cuDNN path against the step-by-step path, generate() and the pipelines, contiguous cuDNN weights, and the
mixed-precision policy under CUDA autocast (where PyTorch itself would run LSTM/GRU in fp16).

Runs only where CUDA is available (`pytest -m gpu tests/test_cuda.py`); TF32 is switched off so that the GPU
computes in true fp32 and the CPU tolerances apply."""

import copy
import warnings

import pytest
import torch
from transformers import pipeline

from helpers import (
    CELL_TYPES,
    LOGIT_TOL,
    SEQ2SEQ_IDS,
    SEQ2SEQ_VARIANTS,
    make_lm,
    make_seq2seq,
    random_tokens,
    right_padded,
    seq2seq_variant_config,
)
from rnn_seq2seq_hf.models.recurrent import RecurrentStack, weights_share_one_buffer
from rnn_seq2seq_hf.tokenization import train_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")
GRAD_TOL = dict(atol=1e-4, rtol=1e-3)


@pytest.fixture(autouse=True)
def _true_fp32():
    """TF32 matmuls would differ from the CPU by ~1e-3; the comparisons below are about fp32 semantics."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def padded_batch():
    source, mask = right_padded([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]])
    return source, mask, random_tokens(3, 6)


def loss_logits_grads(model, **inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().cpu(), out.logits.detach().float().cpu(), grads


def to_cuda(**tensors):
    return {name: tensor.to(CUDA) for name, tensor in tensors.items()}


@pytest.mark.parametrize(("cell", "attention", "feeding"), SEQ2SEQ_VARIANTS, ids=SEQ2SEQ_IDS)
def test_seq2seq_on_cuda_equals_cpu_outputs_and_gradients(cell, attention, feeding):
    model = make_seq2seq(config=seq2seq_variant_config(cell, attention, feeding)).train()
    source, mask, labels = padded_batch()
    inputs = dict(input_ids=source, attention_mask=mask, labels=labels)
    loss_cpu, logits_cpu, grads_cpu = loss_logits_grads(model, **inputs)
    gpu_model = copy.deepcopy(model).to(CUDA)
    loss_gpu, logits_gpu, grads_gpu = loss_logits_grads(gpu_model, **to_cuda(**inputs))
    torch.testing.assert_close(logits_gpu, logits_cpu, **LOGIT_TOL)
    torch.testing.assert_close(loss_gpu, loss_cpu, **LOGIT_TOL)
    assert grads_gpu.keys() == grads_cpu.keys()
    for name in grads_cpu:
        torch.testing.assert_close(grads_gpu[name], grads_cpu[name], **GRAD_TOL, msg=name)


FUSABLE = [(c, a, f) for c, a, f in SEQ2SEQ_VARIANTS if a != "bahdanau" and not f]


@pytest.mark.parametrize(("cell", "attention", "feeding"), FUSABLE, ids=[f"{c}-{a}" for c, a, _ in FUSABLE])
def test_fused_cudnn_path_equals_step_by_step_on_cuda(cell, attention, feeding):
    model = make_seq2seq(config=seq2seq_variant_config(cell, attention, feeding)).train().to(CUDA)
    source, mask, labels = padded_batch()
    inputs = to_cuda(input_ids=source, attention_mask=mask, labels=labels)
    results = []
    for fused in (True, False):
        model.model.decoder.use_fused = fused
        results.append(loss_logits_grads(model, **inputs))
    (_, logits_a, grads_a), (_, logits_b, grads_b) = results
    torch.testing.assert_close(logits_a, logits_b, **LOGIT_TOL)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], **GRAD_TOL, msg=name)


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("input_to_output", [False, True])
def test_lm_on_cuda_equals_cpu_and_decodes_incrementally(cell, input_to_output):
    model = make_lm(cell_type=cell, input_to_output=input_to_output).train()
    tokens = random_tokens(3, 7)
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0  # a left-padded row
    inputs = dict(input_ids=tokens, attention_mask=mask, labels=tokens.masked_fill(mask == 0, -100))
    loss_cpu, logits_cpu, grads_cpu = loss_logits_grads(model, **inputs)
    gpu_model = copy.deepcopy(model).to(CUDA)
    loss_gpu, logits_gpu, grads_gpu = loss_logits_grads(gpu_model, **to_cuda(**inputs))
    torch.testing.assert_close(logits_gpu, logits_cpu, **LOGIT_TOL)
    for name in grads_cpu:
        torch.testing.assert_close(grads_gpu[name], grads_cpu[name], **GRAD_TOL, msg=name)

    gpu_model.eval()
    tokens = tokens.to(CUDA)
    with torch.no_grad():
        full = gpu_model(input_ids=tokens).logits
        cache, steps = None, []
        for t in range(tokens.shape[1]):
            out = gpu_model(input_ids=tokens[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **LOGIT_TOL)


@pytest.mark.parametrize(("attention", "feeding"), [("general", False), ("bahdanau", True), ("dot", True)])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_seq2seq_generate_on_cuda_equals_cpu(attention, feeding, num_beams):
    model = make_seq2seq(attention_type=attention, input_feeding=feeding)
    source, mask, _ = padded_batch()
    kwargs = dict(
        max_new_tokens=8, num_beams=num_beams, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    cpu = model.generate(input_ids=source, attention_mask=mask, **kwargs)
    gpu = copy.deepcopy(model).to(CUDA).generate(**to_cuda(input_ids=source, attention_mask=mask), **kwargs)
    assert torch.equal(gpu.sequences.cpu(), cpu.sequences)
    if num_beams > 1:
        torch.testing.assert_close(gpu.sequences_scores.cpu(), cpu.sequences_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_lm_generate_left_padded_on_cuda_equals_cpu(num_beams):
    model = make_lm()
    prompts = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = (prompts != 0).long()
    kwargs = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False)
    cpu = model.generate(input_ids=prompts, attention_mask=mask, **kwargs)
    gpu = copy.deepcopy(model).to(CUDA).generate(**to_cuda(input_ids=prompts, attention_mask=mask), **kwargs)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.fixture
def contiguity_warnings_are_errors():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*contiguous chunk.*")
        yield


@pytest.mark.usefixtures("contiguity_warnings_are_errors")
def test_pipelines_place_the_model_on_the_gpu():
    tokenizer = train_tokenizer(["a b c d e f g h i j k l m n o p q r s"], kind="word", vocab_size=None)
    model = make_seq2seq(attention_type="concat")
    expected = pipeline("seq2seq-generation", model=model, tokenizer=tokenizer)(["a b c", "d e"], max_new_tokens=5)
    translator = pipeline("seq2seq-generation", model=copy.deepcopy(model), tokenizer=tokenizer, device=0)
    assert translator.model.device.type == "cuda"
    assert translator(["a b c", "d e"], max_new_tokens=5) == expected

    lm_tokenizer = train_tokenizer(
        ["a b c d e f g h i j k l m n o p q r s"], kind="word", vocab_size=None, padding_side="left", add_eos=False
    )
    lm = make_lm()
    expected = pipeline("text-generation", model=lm, tokenizer=lm_tokenizer)(
        ["a b", "c d e"], max_new_tokens=4, do_sample=False
    )
    generator = pipeline("text-generation", model=copy.deepcopy(lm), tokenizer=lm_tokenizer, device=0)
    assert generator(["a b", "c d e"], max_new_tokens=4, do_sample=False) == expected


@pytest.mark.usefixtures("contiguity_warnings_are_errors")
def test_cudnn_weights_stay_contiguous_through_training_saving_and_loading(tmp_path):
    """cuDNN warns ("RNN module weights are not part of single contiguous chunk of memory") and copies the weights
    on every call when they are not flattened; a warning here is an error."""
    from transformers import AutoModelForSeq2SeqLM

    model = make_seq2seq(attention_type="general", bidirectional_encoder=True).to(CUDA).train()
    source, mask, labels = padded_batch()
    inputs = to_cuda(input_ids=source, attention_mask=mask, labels=labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).to(CUDA)
    reloaded(**inputs)


@pytest.mark.usefixtures("contiguity_warnings_are_errors")
def test_weights_split_by_outside_code_are_reflattened_once_with_the_same_outputs():
    model = make_seq2seq(attention_type="dot", input_feeding=True).to(CUDA).train()
    source, mask, labels = padded_batch()
    inputs = to_cuda(input_ids=source, attention_mask=mask, labels=labels)
    reference, _, reference_grads = loss_logits_grads(model, **inputs)
    rnn = model.model.decoder.rnn.rnn
    with torch.no_grad():  # what some user code and wrappers do: give each parameter its own memory
        for parameter in rnn.parameters():
            parameter.data = parameter.data.clone()
    assert not weights_share_one_buffer(rnn)
    loss, _, grads = loss_logits_grads(model, **inputs)  # the step-by-step decoder calls cuDNN at every step
    assert weights_share_one_buffer(rnn)
    torch.testing.assert_close(loss, reference)
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], msg=name)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bare_cudnn_rnn_runs_in_fp16_under_bf16_autocast_but_the_stack_stays_fp32(cell):
    """The PyTorch behaviour the policy exists for, checked where it happens, and the policy's answer."""
    bare = getattr(torch.nn, cell.upper())(6, 8, batch_first=True).to(CUDA)
    inputs = torch.randn(3, 5, 6, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bare_out, _ = bare(inputs)
    assert bare_out.dtype == torch.float16  # not bf16: cuDNN's autocast rule hard-codes half

    stack = RecurrentStack(cell, 6, 8, 2).to(CUDA)
    reference, _, _ = stack(inputs)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=dtype):
            outputs, state, _ = stack(inputs)
        assert outputs.dtype == torch.float32 and all(s.dtype == torch.float32 for s in state)
        torch.testing.assert_close(outputs, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_seq2seq_under_cuda_autocast_keeps_the_recurrence_fp32_and_matches_fp32(dtype):
    model = make_seq2seq(attention_type="general").to(CUDA).train()
    source, mask, labels = padded_batch()
    inputs = to_cuda(input_ids=source, attention_mask=mask, labels=labels)
    reference = model(**inputs).loss
    with torch.autocast("cuda", dtype=dtype):
        out = model(**inputs)
    assert out.encoder_last_hidden_state.dtype == torch.float32
    assert out.logits.dtype == dtype
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(reference.item(), rel=2e-2)
    out.loss.backward()
    grad = model.model.decoder.rnn.rnn.weight_hh_l0.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


# --- decoding with CUDA graphs (models/generation_rnn.py) ---------------------------------------------------------


def generate_both_ways(model, **kwargs):
    """generate() on the GPU replaying CUDA graphs, and launching every op (generation_cuda_graphs=False)."""
    results = []
    for graphs in (True, False):
        model.generation_cuda_graphs = graphs
        torch.manual_seed(0)
        results.append(model.generate(**kwargs))
    model.generation_cuda_graphs = True
    return results


@pytest.mark.parametrize(("cell", "attention", "feeding"), SEQ2SEQ_VARIANTS, ids=SEQ2SEQ_IDS)
@pytest.mark.parametrize("num_beams", [1, 4])
def test_cuda_graph_decoding_gives_the_eager_results(cell, attention, feeding, num_beams):
    model = make_seq2seq(config=seq2seq_variant_config(cell, attention, feeding)).to(CUDA)
    source, mask, _ = padded_batch()
    graphed, eager = generate_both_ways(
        model,
        **to_cuda(input_ids=source, attention_mask=mask),
        max_new_tokens=9,
        num_beams=num_beams,
        num_return_sequences=min(num_beams, 2),
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert torch.equal(graphed.sequences, eager.sequences)
    for a, b in zip(graphed.scores, eager.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(graphed.cache.get_state(), eager.cache.get_state(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cuda_graph_decoding_of_the_lm_and_sampling_give_the_eager_results(num_beams):
    model = make_lm(input_to_output=True).to(CUDA)
    prompts = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    inputs = to_cuda(input_ids=prompts, attention_mask=(prompts != 0).long())
    graphed, eager = generate_both_ways(model, **inputs, max_new_tokens=8, num_beams=num_beams)
    assert torch.equal(graphed, eager)
    sampled, sampled_eager = generate_both_ways(model, **inputs, max_new_tokens=8, do_sample=True, top_k=5)
    assert torch.equal(sampled, sampled_eager)


def test_cuda_graph_decoding_equals_transformers_loops_and_the_cpu():
    model = make_seq2seq(attention_type="general", input_feeding=True, seed=7)
    source, mask, _ = padded_batch()
    kwargs = dict(max_new_tokens=10, num_beams=5, num_return_sequences=3, return_dict_in_generate=True)
    cpu = model.generate(input_ids=source, attention_mask=mask, **kwargs)
    gpu_model = copy.deepcopy(model).to(CUDA)
    graphed = gpu_model.generate(**to_cuda(input_ids=source, attention_mask=mask), **kwargs)
    gpu_model.lean_generation = False
    transformers_loop = gpu_model.generate(**to_cuda(input_ids=source, attention_mask=mask), **kwargs)
    assert torch.equal(graphed.sequences.cpu(), cpu.sequences)
    assert torch.equal(graphed.sequences, transformers_loop.sequences)
    assert torch.equal(graphed.beam_indices, transformers_loop.beam_indices)


def test_gradient_checkpointing_on_cuda_gives_the_gradients_of_plain_training():
    model = make_seq2seq(attention_type="bahdanau", hidden_dropout=0.0).to(CUDA).train()
    source, mask, labels = padded_batch()
    inputs = to_cuda(input_ids=source, attention_mask=mask, labels=labels)
    _, _, plain = loss_logits_grads(model, **inputs)
    model.activation_checkpointing_enable()
    _, _, checkpointed = loss_logits_grads(model, **inputs)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], **GRAD_TOL, msg=name)
