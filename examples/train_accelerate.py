"""Train a translation model with the Accelerate loop, on 1 process or many (one task, read top to bottom).

    # one process (CPU or one GPU)
    python examples/train_accelerate.py --train train.de,train.en --validation val.de,val.en --output_dir runs/acc
    # 2 CPU processes (gloo)
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 examples/train_accelerate.py ...
    # all GPUs of this machine
    accelerate launch --multi_gpu --num_processes 8 examples/train_accelerate.py ...

Every `LoopArguments` field is an option (`--max_steps`, `--per_device_train_batch_size`, `--mixed_precision bf16`,
`--save_steps`, `--label_smoothing_factor 0.1`, `--report_to tensorboard`, ...); validation BLEU with the best
checkpoint and early stopping:

    ... --eval_strategy epoch --metric_for_best_model bleu --load_best_model_at_end --early_stopping_patience 3

Run the same command again after a crash: it resumes from the newest complete checkpoint in `--output_dir` and ends
where an uninterrupted run would have. The checkpoints carry a fingerprint of the data and model options, so the
same output folder with other data is refused instead of resumed (`--resume false` starts over). The same loop is
behind `rnn-seq2seq train-translation --engine accelerate`.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import set_seed
from transformers import DataCollatorForSeq2Seq, HfArgumentParser

from rnn_seq2seq_hf import RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration
from rnn_seq2seq_hf.accelerate_loop import LoopArguments, train_with_accelerate
from rnn_seq2seq_hf.data import load_parallel, tokenize_parallel
from rnn_seq2seq_hf.metrics import translation_scores
from rnn_seq2seq_hf.tokenization import special_token_ids, train_tokenizer


@dataclass
class DataArguments:
    train: str = field(metadata={"help": "'source_file,target_file', a .tsv or a .jsonl file"})
    validation: str = field(metadata={"help": "validation data, same forms"})
    vocab_size: int = field(default=8000, metadata={"help": "joint BPE vocabulary"})
    max_length: int = field(default=60, metadata={"help": "longer training pairs are dropped (tokens)"})
    hidden_size: int = 512
    embedding_size: int = 256
    attention_type: str = "general"


def fingerprint(data_args: DataArguments) -> str:
    """What makes this run this run: the data (file contents) and the data and model options."""
    digest = hashlib.sha256(json.dumps(asdict(data_args), sort_keys=True).encode())
    for name in ",".join((data_args.train, data_args.validation)).split(","):
        if Path(name).is_file():
            digest.update(Path(name).read_bytes())
    return digest.hexdigest()[:16]


def main() -> None:
    data_args, loop_args = HfArgumentParser((DataArguments, LoopArguments)).parse_args_into_dataclasses()
    loop_args.fingerprint = loop_args.fingerprint or fingerprint(data_args)

    # 1. Data and a joint subword vocabulary (every process builds the same one: training is deterministic).
    train, validation = load_parallel(data_args.train), load_parallel(data_args.validation)
    tokenizer = train_tokenizer(list(train["source"]) + list(train["target"]), "bpe", data_args.vocab_size)
    columns = ["input_ids", "attention_mask", "labels"]
    train_features = tokenize_parallel(train, tokenizer, data_args.max_length, data_args.max_length)
    validation_features = tokenize_parallel(validation, tokenizer)

    # 2. The model, seeded so that every process starts from the same weights. (The loop's Accelerator sets up the
    #    processes; creating a PartialState() first would miss ACCELERATE_USE_CPU.)
    set_seed(loop_args.seed)
    config = RNNSeq2SeqConfig(
        vocab_size=len(tokenizer),
        hidden_size=data_args.hidden_size,
        embedding_size=data_args.embedding_size,
        attention_type=data_args.attention_type,
        share_embeddings=True,
        **special_token_ids(tokenizer),
    )
    model = RNNSeq2SeqForConditionalGeneration(config)

    # 3. Train (data-parallel when launched so), checkpoint, evaluate on every process, score on the gathered set.
    model, state, metrics = train_with_accelerate(
        model,
        train_features.select_columns(columns),
        DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        loop_args,
        eval_dataset=validation_features.select_columns(columns),
        tokenizer=tokenizer,
        compute_metrics=translation_scores,
    )

    # 4. The main process writes the model folder (loads with AutoModelForSeq2SeqLM, or trust_remote_code).
    if PartialState().is_main_process:
        folder = Path(loop_args.output_dir) / "model"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print({k: v for k, v in metrics.items() if k != "example_ids"}, f"-> {folder}")


if __name__ == "__main__":
    main()
