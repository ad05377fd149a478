"""The `rnn-seq2seq` command: demo, training, translation, evaluation and generation.

Every subcommand has `--help`. A wrong path or argument prints one line on stderr and exits with status 2, without
a traceback (set RNN_SEQ2SEQ_DEBUG=1 to see it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

PROG = "rnn-seq2seq"


class UsageError(Exception):
    """A problem with the command line or its inputs, reported as one line."""


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def _load(model_dir: str, kind: str, device: str):
    """Model and tokenizer from a folder written by training (or any folder/Hub id with both)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    import rnn_seq2seq_hf  # noqa: F401  (registers the model types)

    looks_local = model_dir.startswith(("/", ".", "~")) or model_dir.count("/") != 1  # Hub ids are "owner/name"
    if looks_local and not Path(model_dir).expanduser().exists():
        raise UsageError(f"--model {model_dir}: no such folder")
    model_dir = str(Path(model_dir).expanduser()) if looks_local else model_dir
    if Path(model_dir).is_dir() and not (Path(model_dir) / "config.json").is_file():
        raise UsageError(f"--model {model_dir}: not a model folder (no config.json)")
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(model_dir)
    except ValueError as error:
        reason = str(error).splitlines()[0]
        raise UsageError(f"--model {model_dir}: cannot load a {kind} model here ({reason})") from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.to(_device(device)).eval(), tokenizer


def _generation_kwargs(args) -> dict:
    """The generation options given on the command line (the rest come from the model's generation config)."""
    names = ("num_beams", "max_new_tokens", "length_penalty", "do_sample", "temperature", "top_k", "top_p")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _read_text_lines(path: str) -> list[str]:
    from .data import read_lines

    return read_lines(path, allow_empty_lines=True)


# --- subcommands ---------------------------------------------------------------------------------------------------


def cmd_demo(args) -> None:
    from .demo import run_demo

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


def _run_quietly(function, *positional, **keywords):
    """Run a training job with everything it prints sent to stderr: stdout carries only the final metrics."""
    import contextlib

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


def cmd_translate(args) -> None:
    from .inference import translate

    model, tokenizer = _load(args.model, "seq2seq", args.device)
    lines = [line.rstrip("\n").rstrip("\r") for line in sys.stdin]
    outputs = translate(model, tokenizer, lines, batch_size=args.batch_size, **_generation_kwargs(args))
    sys.stdout.write("".join(output.replace("\n", " ") + "\n" for output in outputs))


def cmd_evaluate(args) -> None:
    from .inference import translate
    from .metrics import translation_scores

    sources, references = _read_text_lines(args.source), _read_text_lines(args.reference)
    if len(sources) != len(references):
        raise UsageError(f"{args.source} has {len(sources)} lines but {args.reference} has {len(references)}")
    model, tokenizer = _load(args.model, "seq2seq", args.device)
    outputs = translate(
        model, tokenizer, sources, batch_size=args.batch_size, progress=True, **_generation_kwargs(args)
    )
    scores = {"sentences": len(sources), **translation_scores(outputs, references)}
    if args.output:
        Path(args.output).write_text("\n".join(outputs) + "\n")
    print(json.dumps(scores, indent=2))


def cmd_evaluate_lm(args) -> None:
    from tokenizers import decoders

    from .data import lm_token_stream, read_lm_text
    from .inference import evaluate_perplexity

    lines = read_lm_text(args.text)
    model, tokenizer = _load(args.model, "lm", args.device)
    per_line = not isinstance(tokenizer.backend_tokenizer.decoder, decoders.Fuse)  # character models read streams
    stream = lm_token_stream(lines, tokenizer, per_line)
    scores = evaluate_perplexity(model, stream, args.batch_size, args.block_size, progress=True)
    print(json.dumps(scores, indent=2))


def cmd_generate(args) -> None:
    import torch
    from tokenizers import decoders

    model, tokenizer = _load(args.model, "lm", args.device)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    encoded = tokenizer([args.prompt], return_tensors="pt", add_special_tokens=False).to(model.device)
    if encoded["input_ids"].shape[1] == 0:
        raise UsageError("--prompt is empty after tokenization; give at least one character")
    generated = model.generate(**encoded, num_return_sequences=args.num_return_sequences, **_generation_kwargs(args))
    word_level = not isinstance(tokenizer.backend_tokenizer.decoder, decoders.Fuse)
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


def _add_generation_options(parser: argparse.ArgumentParser, sampling: bool) -> None:
    group = parser.add_argument_group("generation (defaults: the model's generation config)")
    group.add_argument("--num-beams", type=int, help="beam size (1 = greedy)")
    group.add_argument("--max-new-tokens", type=int, help="longest output in tokens")
    group.add_argument("--length-penalty", type=float, help="beam score = log p / length ** penalty")
    if sampling:
        group.add_argument("--do-sample", action="store_true", default=None, help="sample instead of searching")
        group.add_argument("--temperature", type=float)
        group.add_argument("--top-k", type=int)
        group.add_argument("--top-p", type=float)


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
        "translate", help="translate stdin to stdout, one sentence per line, in order (empty line -> empty line)"
    )
    translate.add_argument("--model", required=True, help="model folder (or Hub id)")
    translate.add_argument("--batch-size", type=int, default=32)
    translate.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    _add_generation_options(translate, sampling=False)
    translate.set_defaults(func=cmd_translate)

    evaluate = subcommands.add_parser("evaluate", help="BLEU and chrF of a translation model on a file pair")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--source", required=True, help="source sentences, one per line")
    evaluate.add_argument("--reference", required=True, help="reference translations, one per line")
    evaluate.add_argument("--output", help="also write the translations to this file")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--device", default="auto")
    _add_generation_options(evaluate, sampling=False)
    evaluate.set_defaults(func=cmd_evaluate)

    evaluate_lm = subcommands.add_parser("evaluate-lm", help="perplexity of a language model on a text file")
    evaluate_lm.add_argument("--model", required=True)
    evaluate_lm.add_argument("--text", required=True)
    evaluate_lm.add_argument("--batch-size", type=int, default=10, help="parallel streams")
    evaluate_lm.add_argument("--block-size", type=int, default=70, help="tokens per forward call (state carried)")
    evaluate_lm.add_argument("--device", default="auto")
    evaluate_lm.set_defaults(func=cmd_evaluate_lm)

    generate = subcommands.add_parser("generate", help="continue a prompt with a language model")
    generate.add_argument("--model", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--num-return-sequences", type=int, default=1)
    generate.add_argument("--seed", type=int, help="random seed for sampling")
    generate.add_argument("--device", default="auto")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "num_beams", "max_new_tokens", "block_size", "num_return_sequences"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except (UsageError, ValueError, OSError, KeyError) as error:
        if os.environ.get("RNN_SEQ2SEQ_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
