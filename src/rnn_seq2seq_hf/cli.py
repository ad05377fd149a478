"""The `rnn-seq2seq` command: demo, training, translation, scoring, evaluation and generation.

Every subcommand has `--help`. A wrong path or argument prints one line on stderr and exits with status 2, without
a traceback (set RNN_SEQ2SEQ_DEBUG=1 to see it). stdout carries only results; logs and progress go to stderr, and
are quiet unless `--verbose` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

PROG = "rnn-seq2seq"
CHUNK_LINES = 500  # translate reads, translates and writes this many lines at a time (fewer when input is slow)
PROGRESS_AFTER_LINES = 300  # piped input this long gets a progress bar on stderr (a file always does)
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


class UsageError(Exception):
    """A problem with the command line or its inputs, reported as one line."""


def _device(name: str):
    """The torch device for `--device NAME`, checked before any model is loaded."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: expected {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: expected {DEVICE_CHOICES}")
    return device


def _load(model_dir: str, kind: str, device, trust_remote_code: bool = False, argument: str = "--model"):
    """Model and tokenizer from a folder written by training (or any folder/Hub id with both); see loading.py for
    what may be loaded (installed classes, safetensors only, a quick Hub check)."""
    from .loading import load_model_and_tokenizer

    device = _device(device) if isinstance(device, str) else device
    return load_model_and_tokenizer(model_dir, kind, device, trust_remote_code=trust_remote_code, argument=argument)


def _load_seq2seq(args, device):
    """One Seq2Seq model, or an ensemble of every `--model` given (which must share their vocabulary)."""
    names = args.model
    loaded = [_load(name, "seq2seq", device, args.trust_remote_code) for name in names]
    if len(loaded) == 1:
        return loaded[0]
    from .ensemble import Seq2SeqEnsemble, check_compatible, check_same_tokenizer

    labels = [f"--model {name}" for name in names]
    models, tokenizers = zip(*loaded)
    check_compatible(models, labels)
    check_same_tokenizer(tokenizers, labels)
    return Seq2SeqEnsemble(list(models)).to(device).eval(), tokenizers[0]


def _generation_kwargs(args) -> dict:
    """The generation options given on the command line (the rest come from the model's generation config)."""
    names = ("num_beams", "max_new_tokens", "length_penalty", "do_sample", "temperature", "top_k", "top_p")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _read_text_lines(path: str) -> list[str]:
    from .data import read_lines

    return read_lines(path, allow_empty_lines=True)


def _check_output_file(path: str | None, argument: str) -> Path | None:
    """Refuse an output path whose folder does not exist (or that is a folder) before any work starts."""
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{argument} {path}: is a folder; give a file name")
    if not target.parent.is_dir():
        raise UsageError(f"{argument} {path}: the folder {target.parent} does not exist")
    return target


@contextlib.contextmanager
def _atomic_output(path: Path):
    """A text file written to a temporary sibling, flushed to disk and renamed over `path` only on success."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _batching(args) -> dict:
    """`batch_size` / `max_tokens` for the inference functions: with only --max-tokens, no sentence limit."""
    batch_size = args.batch_size if args.batch_size is not None or args.max_tokens is not None else 32
    return {"batch_size": batch_size, "max_tokens": args.max_tokens}


# --- subcommands ---------------------------------------------------------------------------------------------------


def cmd_demo(args) -> None:
    from .demo import run_demo
    from .run_folder import RunFolderError, is_finished_run

    if is_finished_run(args.output_dir) and not args.overwrite_output_dir:  # (run_demo says the same, after work)
        raise RunFolderError(
            f"{args.output_dir} holds a finished run (model/ and metrics.json); pass --overwrite-output-dir to "
            "replace it, or choose another --output-dir"
        )
    _hint_if_busy(args)
    run_demo(args.output_dir, quick=args.quick, overrides=args.set, overwrite_output_dir=args.overwrite_output_dir)


def _parallel(args, split: str, spec: str | None):
    from .data import load_parallel, load_parallel_dataset

    if args.dataset:
        return load_parallel_dataset(args.dataset, split, args.source_lang, args.target_lang, args.dataset_config)
    return load_parallel(spec, args.source_lang, args.target_lang) if spec else None


def _checked_training_recipe(args, task: str) -> dict:
    """The recipe, validated before any work (a misspelt --set key is one line, not a traceback after hours), and
    the output folder checked for a finished run."""
    from .recipes import load_recipe
    from .run_folder import RunFolderError, is_finished_run
    from .training import check_recipe

    recipe = load_recipe(args.recipe, args.set)
    if recipe["task"] != task:
        other = "train-lm" if recipe["task"] == "language_modeling" else "train-translation"
        raise UsageError(f"--recipe {args.recipe} is a {recipe['task']} recipe; use {other}")
    recipe = check_recipe(recipe, args.engine, args.model_name_or_path)
    if is_finished_run(args.output_dir) and not args.overwrite_output_dir:
        raise RunFolderError(
            f"{args.output_dir} holds a finished run (model/ and metrics.json); pass --overwrite-output-dir to "
            "replace it, or choose another --output-dir"
        )
    return recipe


def _data_name(args, files: list[str | None]) -> str:
    """How the data is named in the model card: --dataset-name, the --dataset name (a local folder by its own name),
    or the training files' names; never a path of this machine."""
    if args.dataset_name:
        return args.dataset_name
    if args.dataset:
        return Path(args.dataset).name if Path(args.dataset).exists() else args.dataset
    return ",".join(Path(part.strip()).name for spec in files if spec for part in spec.split(","))


def _run_quietly(args, function, *positional, **keywords):
    """Run a training job with everything it prints sent to stderr: stdout carries only the final metrics. The
    recipe and the data have been checked by now, so a busy machine's hint comes only before real work."""
    import contextlib

    _hint_if_busy(args)
    with contextlib.redirect_stdout(sys.stderr):
        return function(*positional, **keywords)


def cmd_train_translation(args) -> None:
    from .training import train_translation

    recipe = _checked_training_recipe(args, "translation")
    if not args.dataset and not (args.train and args.validation):
        raise UsageError("give --train and --validation files, or --dataset")
    train = _parallel(args, "train", args.train)
    validation = _parallel(args, args.validation_split, args.validation)
    test = _parallel(args, args.test_split, args.test) if (args.test or args.dataset and args.test_split) else None
    name = _data_name(args, [args.train])
    metrics = _run_quietly(
        args,
        train_translation,
        recipe,
        args.output_dir,
        train,
        validation,
        test,
        data_description=args.data_description or "",
        dataset_name=name,
        dataset_type=name,
        languages=[args.source_lang, args.target_lang],
        engine=args.engine,
        model_name_or_path=args.model_name_or_path,
        overwrite_output_dir=args.overwrite_output_dir,
    )
    if not metrics:  # not the main process of a distributed run
        return
    print(json.dumps({k: metrics[k] for k in ("bleu", "bleu_lowercase", "chrf", "exact_match", "split")}, indent=2))
    _push_after_training(args)


def cmd_train_lm(args) -> None:
    from .data import load_dataset_splits, read_lm_text, select_split, split_text
    from .training import train_language_model

    recipe = _checked_training_recipe(args, "language_modeling")
    if args.dataset:
        splits = load_dataset_splits(args.dataset, args.dataset_config)
        columns = select_split(splits, "train", args.dataset).column_names
        if args.text_column not in columns:
            raise UsageError(f"--text-column {args.text_column}: --dataset {args.dataset} has columns {columns}")
        train_lines = [str(text) for text in select_split(splits, "train", args.dataset)[args.text_column]]
        validation = select_split(splits, args.validation_split, args.dataset)
        validation_lines = [str(text) for text in validation[args.text_column]]
        test_lines = [str(t) for t in splits[args.test_split][args.text_column]] if args.test_split in splits else None
    else:
        if not args.train:
            raise UsageError("give --train (and --validation or --validation-fraction), or --dataset")
        train_lines = read_lm_text(args.train)
        if args.validation:
            validation_lines = read_lm_text(args.validation)
        elif args.validation_fraction:
            train_lines, validation_lines = split_text(train_lines, args.validation_fraction)
        else:
            raise UsageError("give --validation FILE or --validation-fraction F")
        test_lines = read_lm_text(args.test) if args.test else None
    name = _data_name(args, [args.train])
    metrics = _run_quietly(
        args,
        train_language_model,
        recipe,
        args.output_dir,
        train_lines,
        validation_lines,
        test_lines,
        data_description=args.data_description or "",
        dataset_name=name,
        dataset_type=name,
        engine=args.engine,
        model_name_or_path=args.model_name_or_path,
        overwrite_output_dir=args.overwrite_output_dir,
    )
    if not metrics:  # not the main process of a distributed run
        return
    print(json.dumps({k: v for k, v in metrics.items() if "perplexity" in k or "bits" in k}, indent=2))
    _push_after_training(args)


def cmd_average_checkpoints(args) -> None:
    from .averaging import averaged_model, last_checkpoints
    from .training import save_model_folder

    if bool(args.checkpoints) == bool(args.last):
        raise UsageError("give --checkpoints DIR [DIR ...], or --last N with --run-dir RUN")
    if args.last and not args.run_dir:
        raise UsageError("--last N needs --run-dir RUN (the output folder of a training run)")
    if args.checkpoints:
        for folder in args.checkpoints:
            if not Path(folder).is_dir():
                raise UsageError(f"--checkpoints {folder}: no such folder")
    paths = [Path(p) for p in args.checkpoints] if args.checkpoints else last_checkpoints(args.run_dir, args.last)
    model, tokenizer = averaged_model(paths)
    save_model_folder(model, tokenizer, args.output_dir)
    print(json.dumps({"averaged": [str(path) for path in paths], "output_dir": str(args.output_dir)}, indent=2))


def _push_after_training(args) -> None:
    if args.push_to_hub:
        from .hub import push_folder

        url = push_folder(Path(args.output_dir) / "model", args.push_to_hub, private=args.private or None)
        print(f"pushed {Path(args.output_dir) / 'model'} to {args.push_to_hub}: {url}", file=sys.stderr)


def _one_line(text: str, columns: bool) -> str:
    """A field of the output: line breaks (and, when there are several columns, tabs) become spaces."""
    text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return text.replace("\t", " ") if columns else text


def _format_hypotheses(index: int, hypotheses, args, eos_token: str | None) -> str:
    """The output lines of one input sentence (see `translate --help` for the columns)."""
    shown = hypotheses if args.n_best else hypotheses[:1]
    columns = bool(args.n_best or args.print_scores or args.print_alignment)
    lines = []
    for hypothesis in shown:
        fields = [str(index)] if args.n_best else []
        if args.n_best or args.print_scores:
            fields.append("" if hypothesis.score is None else f"{hypothesis.score:.6f}")
        fields.append(_one_line(hypothesis.text, columns))
        if args.print_alignment == "pharaoh":
            pairs = hypothesis.alignment.hard(eos_token) if hypothesis.alignment else []
            fields.append(" ".join(f"{source}-{target}" for source, target in pairs))
        elif args.print_alignment == "json":
            alignment = hypothesis.alignment.to_dict() if hypothesis.alignment else {}
            fields.append(json.dumps(alignment, ensure_ascii=False))
        lines.append("\t".join(fields) + "\n")
    return "".join(lines)


def _count_lines(path: Path) -> int | None:
    if not path.is_file():  # a FIFO or /dev/stdin: counting would consume it
        return None
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def cmd_translate(args) -> None:
    from tqdm.auto import tqdm

    from .inference import translate_hypotheses
    from .streaming import read_line_chunks

    input_path = Path(args.input) if args.input else None
    if input_path is not None and not input_path.exists():
        raise UsageError(f"--input {args.input}: no such file")
    output_path = _check_output_file(args.output, "--output")
    if args.n_best and args.num_beams is not None and args.num_beams < args.n_best:
        raise UsageError(f"--n-best {args.n_best} needs --num-beams >= {args.n_best}, got {args.num_beams}")
    device = _device(args.device)
    model, tokenizer = _load_seq2seq(args, device)
    options = {
        **_batching(args),
        **_generation_kwargs(args),
        "n_best": args.n_best or 1,
        "with_scores": bool(args.n_best or args.print_scores),
        "with_alignment": bool(args.print_alignment),
    }
    interactive = input_path is None and sys.stdin.isatty()
    if interactive:
        print(f"{PROG} translate: type a sentence and press Enter; Ctrl-D ends.", file=sys.stderr, flush=True)
    total = _count_lines(input_path) if input_path is not None else None
    progress = None

    with contextlib.ExitStack() as stack:
        source = stack.enter_context(input_path.open("rb")) if input_path is not None else sys.stdin.buffer
        sink = stack.enter_context(_atomic_output(output_path)) if output_path is not None else sys.stdout
        chunks = read_line_chunks(source, args.input or "stdin", 1 if interactive else CHUNK_LINES)
        done = 0
        for chunk in chunks:
            if (
                progress is None
                and not interactive
                and (input_path is not None or done + len(chunk) > PROGRESS_AFTER_LINES)
            ):
                progress = stack.enter_context(
                    tqdm(total=total, initial=done, desc="translating", unit=" lines", file=sys.stderr)
                )
            hypotheses = translate_hypotheses(
                model, tokenizer, chunk, on_batch=progress.update if progress is not None else None, **options
            )
            if progress is not None:
                progress.update(len(chunk) - sum(1 for line in chunk if line.strip()))  # empty lines: no batch
            sink.write(
                "".join(_format_hypotheses(done + i, h, args, tokenizer.eos_token) for i, h in enumerate(hypotheses))
            )
            sink.flush()
            done += len(chunk)


def cmd_evaluate(args) -> None:
    from .inference import translate
    from .metrics import translation_scores

    output_path = _check_output_file(args.output, "--output")
    sources, references = _read_text_lines(args.source), _read_text_lines(args.reference)
    if len(sources) != len(references):
        raise UsageError(f"{args.source} has {len(sources)} lines but {args.reference} has {len(references)}")
    device = _device(args.device)
    model, tokenizer = _load_seq2seq(args, device)
    outputs = translate(model, tokenizer, sources, progress=True, **_batching(args), **_generation_kwargs(args))
    scores = {"sentences": len(sources), **translation_scores(outputs, references)}
    if output_path is not None:
        with _atomic_output(output_path) as handle:
            handle.write("".join(_one_line(output, False) + "\n" for output in outputs))
    print(json.dumps(scores, indent=2))


def cmd_score(args) -> None:
    import math

    from .inference import score_translations

    output_path = _check_output_file(args.output, "--output")
    sources, targets = _read_text_lines(args.source), _read_text_lines(args.target)
    if len(sources) != len(targets):
        raise UsageError(f"{args.source} has {len(sources)} lines but {args.target} has {len(targets)}")
    device = _device(args.device)
    model, tokenizer = _load_seq2seq(args, device)
    scores = score_translations(
        model, tokenizer, sources, targets, progress=len(sources) > PROGRESS_AFTER_LINES, **_batching(args)
    )
    lines = "".join(f"{s.log_prob:.6f}\t{s.tokens}\t{s.perplexity:.6f}\n" for s in scores)
    if output_path is not None:
        with _atomic_output(output_path) as handle:
            handle.write(lines)
    else:
        sys.stdout.write(lines)
    log_prob, tokens = sum(s.log_prob for s in scores), sum(s.tokens for s in scores)
    print(
        f"{PROG} score: {len(scores)} sentences, {tokens} target tokens, log-probability {log_prob:.4f}, "
        f"perplexity {math.exp(-log_prob / tokens):.4f}",
        file=sys.stderr,
    )


def cmd_evaluate_lm(args) -> None:
    from .data import lm_token_stream, read_lm_text
    from .inference import evaluate_perplexity
    from .tokenization import lm_reads_lines

    lines = read_lm_text(args.text)
    model, tokenizer = _load(args.model, "lm", _device(args.device), args.trust_remote_code)
    stream = lm_token_stream(lines, tokenizer, lm_reads_lines(tokenizer))  # character models read raw text
    scores = evaluate_perplexity(model, stream, args.batch_size, args.block_size, progress=True)
    print(json.dumps(scores, indent=2))


def cmd_generate(args) -> None:
    import torch

    from .inference import _length_limit
    from .tokenization import tokenizer_kind

    model, tokenizer = _load(args.model, "lm", _device(args.device), args.trust_remote_code)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    encoded = tokenizer([args.prompt], return_tensors="pt", add_special_tokens=False).to(model.device)
    if encoded["input_ids"].shape[1] == 0:
        raise UsageError("--prompt is empty after tokenization; give at least one character")
    options = _length_limit(model, _generation_kwargs(args))
    generated = model.generate(**encoded, num_return_sequences=args.num_return_sequences, **options)
    word_level = tokenizer_kind(tokenizer) != "char"
    for sequence in generated:
        text = tokenizer.decode(sequence, skip_special_tokens=True)
        print(text.strip() if word_level else text)  # words decode with a leading space
        if args.num_return_sequences > 1:
            print("---")


def cmd_push(args) -> None:
    from .hub import push_folder

    if not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model}: no such folder")
    url = push_folder(args.model, args.repo_id, private=args.private or None, commit_message=args.commit_message)
    print(url)


def cmd_presets(args) -> None:
    from .recipes import available_presets, find_recipe_file, load_recipe

    for name in available_presets():
        recipe = load_recipe(name)
        first_line = str(recipe.get("description", "")).strip().split(". ")[0]
        print(f"{name:<28} {recipe['task']:<18} {first_line[:70]}  ({find_recipe_file(name)})")


# --- parser --------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _add_generation_options(parser: argparse.ArgumentParser, sampling: bool) -> None:
    group = parser.add_argument_group("generation (defaults: the model's generation config)")
    group.add_argument("--num-beams", type=_positive_int, help="beam size (1 = greedy)")
    group.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        help="longest output in tokens (default: the model's generation config, else 256)",
    )
    group.add_argument("--length-penalty", type=float, help="beam score = log p / length ** penalty")
    if sampling:
        group.add_argument("--do-sample", action="store_true", default=None, help="sample instead of searching")
        group.add_argument("--temperature", type=float)
        group.add_argument("--top-k", type=int)
        group.add_argument("--top-p", type=float)


def _add_loading_options(parser: argparse.ArgumentParser, ensemble: bool) -> None:
    if ensemble:
        parser.add_argument(
            "--model",
            required=True,
            action="append",
            help="model folder or Hub id; repeat (--model A --model B) to decode with an ensemble of models that "
            "share one vocabulary (their probabilities are averaged)",
        )
    else:
        parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (default: auto, a GPU if there is one)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model whose config names its own Python code (auto_map) to run that code; off by default: "
        "models load with this library's classes and nothing from the folder is executed",
    )


def _add_batching_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=_positive_int, help="sentences per batch (default 32)")
    parser.add_argument(
        "--max-tokens",
        type=_positive_int,
        help="source tokens per batch, padding included (sentences sorted by length; output order unchanged); "
        "with --batch-size both limits apply",
    )


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand takes."""
    group = parser.add_argument_group("common options")
    group.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads torch may use (default: torch's choice, one per core); on a shared or busy machine, "
        "the number of idle cores",
    )
    group.add_argument("--verbose", action="store_true", help="show library logs, warnings and progress of loading")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="a preset name (see `rnn-seq2seq presets`) or a YAML file")
    parser.add_argument("--output-dir", required=True, help="folder for the model, metrics and figures")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a recipe value (repeatable)"
    )
    parser.add_argument("--dataset", help="a `datasets` name or local folder instead of files")
    parser.add_argument("--dataset-config", help="configuration name of --dataset")
    parser.add_argument("--validation-split", default="validation", help="split of --dataset used for validation")
    parser.add_argument("--test-split", default="test", help="split of --dataset used for the final scores")
    parser.add_argument("--dataset-name", help="name of the data in the model card")
    parser.add_argument("--data-description", help="description of the data in the model card")
    parser.add_argument(
        "--engine",
        choices=["trainer", "accelerate"],
        default="trainer",
        help="Trainer (default) or the Accelerate loop (crash-safe checkpoints, exact resume); both run data-parallel "
        "under torchrun / accelerate launch",
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="after training, push OUTPUT_DIR/model to the Hub")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    parser.add_argument(
        "--overwrite-output-dir",
        action="store_true",
        help="start over: replace a finished run in --output-dir and ignore its checkpoints (by default a run "
        "resumes from the folder's newest complete checkpoint and refuses a finished run)",
    )
    parser.add_argument(
        "--model-name-or-path",
        metavar="MODEL",
        help="fine-tune this model (a folder or Hub id of an rnn_seq2seq_hf model) with its tokenizer instead of "
        "training a new tokenizer and model; the recipe's model section must be empty or match it",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="RNN language models and attention Seq2Seq models.")
    parser.add_argument(
        "--version", action=_VersionAction, help="print the versions of this library, torch and transformers"
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = subcommands.add_parser("demo", help="train and evaluate the date-rewriting demo (about 2 minutes)")
    demo.add_argument("--output-dir", required=True, help="folder for model/, metrics.json, attention.png")
    demo.add_argument("--quick", action="store_true", help="a few seconds' version (pipeline check, low accuracy)")
    demo.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override the recipe")
    demo.add_argument("--overwrite-output-dir", action="store_true", help="replace a finished demo in --output-dir")
    demo.set_defaults(func=cmd_demo)

    train = subcommands.add_parser(
        "train-translation",
        help="train a translation model from a recipe and parallel data",
        description="Parallel data: 'source_file,target_file' (one sentence per line), a .tsv file "
        "(source<TAB>target) or a .jsonl file ({'de': ..., 'en': ...}); or --dataset NAME.",
    )
    _add_training_options(train)
    train.add_argument("--train", help="training data: 'src_file,tgt_file', a .tsv or a .jsonl file")
    train.add_argument("--validation", help="validation data, same forms")
    train.add_argument("--test", help="test data, same forms (scored at the end)")
    train.add_argument("--source-lang", default="src", help="source language code (JSON keys, model card)")
    train.add_argument("--target-lang", default="tgt", help="target language code")
    train.set_defaults(func=cmd_train_translation)

    lm = subcommands.add_parser("train-lm", help="train a language model from a recipe and text files")
    _add_training_options(lm)
    lm.add_argument("--train", help="training text file")
    lm.add_argument("--validation", help="validation text file")
    lm.add_argument("--validation-fraction", type=float, help="without --validation: hold out the end of --train")
    lm.add_argument("--test", help="test text file (scored at the end)")
    lm.add_argument("--text-column", default="text", help="column of --dataset holding the text")
    lm.set_defaults(func=cmd_train_lm)

    translate = subcommands.add_parser(
        "translate",
        help="translate stdin (or --input) to stdout (or --output), one sentence per line, in order",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Translate one sentence per line, in input order; an empty line gives an empty line. Input is\n"
        "read, translated and written in chunks as it arrives (a terminal gets each line translated at once).\n\n"
        "Output columns, tab-separated:\n"
        "  default                hypothesis\n"
        "  --print-scores         score<TAB>hypothesis\n"
        "  --n-best N             sentence_index<TAB>score<TAB>hypothesis, N lines per sentence, best first\n"
        "                         (sentence_index counts input lines from 0)\n"
        "  --print-alignment      one more last column: 'i-j' pairs (source token i is the most attended while\n"
        "                         writing output token j; subword tokens, counted from 0, the final </s> left\n"
        "                         out), or with --print-alignment json the full attention matrix as JSON\n"
        "The score is log p(hypothesis | source) / length ** length_penalty, the quantity beam search ranks\n"
        "finished hypotheses by (length counts output tokens with </s>; length_penalty is --length-penalty or\n"
        "the model's, 1.0 by default: the mean log-probability per token). Empty input lines get empty fields.",
    )
    _add_loading_options(translate, ensemble=True)
    translate.add_argument("--input", help="read sentences from this file instead of stdin")
    translate.add_argument("--output", help="write translations to this file instead of stdout (written at the end)")
    _add_batching_options(translate)
    translate.add_argument(
        "--n-best", type=_positive_int, metavar="N", help="print the N best hypotheses per sentence"
    )
    translate.add_argument("--print-scores", action="store_true", help="print each hypothesis's score (see above)")
    translate.add_argument(
        "--print-alignment",
        nargs="?",
        const="pharaoh",
        choices=["pharaoh", "json"],
        help="print the alignment of each hypothesis from the model's cross attention (default format: pharaoh)",
    )
    _add_generation_options(translate, sampling=False)
    translate.set_defaults(func=cmd_translate)

    evaluate = subcommands.add_parser("evaluate", help="BLEU and chrF of a translation model on a file pair")
    _add_loading_options(evaluate, ensemble=True)
    evaluate.add_argument("--source", required=True, help="source sentences, one per line")
    evaluate.add_argument("--reference", required=True, help="reference translations, one per line")
    evaluate.add_argument("--output", help="also write the translations to this file")
    _add_batching_options(evaluate)
    _add_generation_options(evaluate, sampling=False)
    evaluate.set_defaults(func=cmd_evaluate)

    score = subcommands.add_parser(
        "score",
        help="forced decoding: log-probability and perplexity of given translations",
        description="For each line pair of --source and --target, the model's log-probability of the target "
        "(teacher-forced, no search), its token count (</s> included) and perplexity exp(-log p / tokens), "
        "tab-separated, one line per pair. The corpus totals go to stderr.",
    )
    _add_loading_options(score, ensemble=True)
    score.add_argument("--source", required=True, help="source sentences, one per line")
    score.add_argument("--target", required=True, help="translations to score, one per line")
    score.add_argument("--output", help="write the scores to this file instead of stdout")
    _add_batching_options(score)
    score.set_defaults(func=cmd_score)

    evaluate_lm = subcommands.add_parser("evaluate-lm", help="perplexity of a language model on a text file")
    _add_loading_options(evaluate_lm, ensemble=False)
    evaluate_lm.add_argument("--text", required=True)
    evaluate_lm.add_argument("--batch-size", type=_positive_int, default=10, help="parallel streams")
    evaluate_lm.add_argument(
        "--block-size", type=_positive_int, default=70, help="tokens per forward call (state carried)"
    )
    evaluate_lm.set_defaults(func=cmd_evaluate_lm)

    generate = subcommands.add_parser("generate", help="continue a prompt with a language model")
    _add_loading_options(generate, ensemble=False)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--num-return-sequences", type=_positive_int, default=1)
    generate.add_argument("--seed", type=int, help="random seed for sampling")
    _add_generation_options(generate, sampling=True)
    generate.set_defaults(func=cmd_generate)

    push = subcommands.add_parser(
        "push", help="push a model folder (model, tokenizer, card, figures) to the Hugging Face Hub"
    )
    push.add_argument("--model", required=True, help="folder written by training (OUTPUT_DIR/model)")
    push.add_argument("--repo-id", required=True, help="owner/name on the Hub (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--commit-message", default="Upload model trained with rnn_seq2seq_hf")
    push.set_defaults(func=cmd_push)

    average = subcommands.add_parser(
        "average-checkpoints",
        help="average the weights of checkpoints into a model folder",
        description="Average the weights of several checkpoints of one run (Trainer or Accelerate engine) into a "
        "model folder with the tokenizer and generation config, written atomically.",
    )
    average.add_argument("--checkpoints", nargs="+", metavar="DIR", help="checkpoint folders to average")
    average.add_argument(
        "--last", type=int, metavar="N", help="average the N newest complete checkpoints of --run-dir"
    )
    average.add_argument("--run-dir", metavar="RUN", help="with --last: the output folder of a training run")
    average.add_argument("--output-dir", required=True, help="the model folder to write")
    average.set_defaults(func=cmd_average_checkpoints)

    presets = subcommands.add_parser("presets", help="list the training presets")
    presets.set_defaults(func=cmd_presets)

    for subparser in subcommands.choices.values():
        _add_common_options(subparser)
    return parser


class _VersionAction(argparse.Action):
    """`--version`: the library's version and those of the libraries that decide its behaviour."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import platform

        import torch
        import transformers

        from . import __version__

        print(
            f"{PROG} {__version__} (torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()})"
        )
        parser.exit()


def _subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


@contextlib.contextmanager
def _logging_for(verbose: bool):
    """Quiet by default: warnings only (the library's own progress lines on the main process), no progress bars
    of loading; `--verbose` shows INFO logs and transformers' warnings. Restored afterwards (for in-process use)."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    root, ours = logging.getLogger(), logging.getLogger("rnn_seq2seq_hf")
    saved = (root.level, ours.level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    saved_hub_bars = hub_utils.are_progress_bars_disabled()
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    ours.setLevel(logging.INFO if verbose or _is_main_process() else logging.WARNING)
    hf_logging.set_verbosity(hf_logging.INFO if verbose else hf_logging.ERROR)
    if verbose:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        root.setLevel(saved[0])
        ours.setLevel(saved[1])
        hf_logging.set_verbosity(saved[2])
        (hf_logging.enable_progress_bar if saved[3] else hf_logging.disable_progress_bar)()
        if not saved_hub_bars:
            hub_utils.enable_progress_bars()


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """`--threads N`: torch's intra-op thread count for the command (restored afterwards, for in-process use)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _busy_machine_hint(threads: int | None) -> str | None:
    """A one-line hint when other jobs keep this machine's cores busy and torch would still use all of them."""
    if threads is not None:
        return None  # the user chose
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    import torch

    idle = max(1, int(cores - load + 0.5))
    if load < 0.75 or torch.get_num_threads() <= idle:
        return None
    return (
        f"note: this machine is busy (load {load:.1f} on {cores} cores) and torch will use {torch.get_num_threads()} "
        f"threads, which can make this run several times slower; try --threads {idle} (README: 'Shared machines')"
    )


def _hint_if_busy(args) -> None:
    """Print the busy-machine hint once, from the main process, when a long command is about to start its work
    (after its arguments, recipe and data were checked: an error stays one line)."""
    if _is_main_process():
        hint = _busy_machine_hint(args.threads)
        if hint:
            print(hint, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # argparse would report them with the top-level usage; the subcommand's is the helpful one
        _subcommand_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extras)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with _logging_for(args.verbose), _torch_threads(args.threads):
            args.func(args)
    except BrokenPipeError:
        # The reader of stdout went away (`rnn-seq2seq translate ... | head`): stop quietly, as `yes | head` does,
        # and point stdout at /dev/null so that the interpreter's final flush does not report the pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command that a closed pipe stopped
    except (UsageError, ValueError, OSError, KeyError) as error:
        if os.environ.get("RNN_SEQ2SEQ_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        _end_distributed()
    return 0


def _end_distributed() -> None:
    """Destroy the process group of a `torchrun` run before the interpreter exits: a group left to interpreter
    shutdown can abort a rank ("terminate called without an active exception")."""
    torch = sys.modules.get("torch")  # nothing to do if the command never imported torch
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
