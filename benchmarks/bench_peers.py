"""Our Seq2Seq model against OpenNMT-py and Joey NMT models of the same architecture and size (issue 12 item 6).

One process, one machine, interleaved rounds (every toolkit's variant in every round), medians, ratios ours / peer
(time per call: below 1 means we are faster). Rows:
- training step without input feeding and with input feeding (forward + backward + Adam, in target tokens per
  second; the same `F.cross_entropy` over the toolkit model's logits for every toolkit, so the models are compared,
  not the loss wrappers);
- greedy and beam-5 decoding of 20 forced steps (EOS banned before step 20), each toolkit with its own search:
  our `generate()`, OpenNMT-py's `Translator` with `GreedySearch` / `BeamSearch`, Joey NMT's `search.greedy` /
  `search.beam_search`.

The architecture (anchor size): bi-LSTM encoder 2 x (2 x 256), LSTM decoder 2 x 512, Luong "general" attention,
embeddings 512, vocabulary 10,000, batch 64, source and target length 20, no dropout; `--tiny`: hidden 32,
embeddings 32, vocabulary 100, batch 8. Differences the toolkits impose:
- OpenNMT-py: the decoder state starts from the encoder's final states ([forward; backward] per layer, as ours);
  "general" attention multiplies the query by W_a at every step (ours projects the memory once). With input
  feeding its decoder is a stack of `nn.LSTMCell`s (`InputFeedRNNDecoder`); without, one `nn.LSTM` call over the
  target (`StdRNNDecoder`), like our fused path.
- Joey NMT: "luong" attention is the same bilinear score (keys projected once); the decoder state starts from the
  top encoder layer's final [forward; backward] state, repeated for every decoder layer ("last"), and the decoder
  always runs a Python loop of one-step calls, with or without input feeding; its attentional layer has a bias.

The peers are NOT dependencies of this library: each is built only when it can be imported, else its rows are
skipped with the reason (also recorded in the JSON). How they were installed for the recorded runs (a separate
venv, torch kept at the project's version):

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.13.0
    /work/peers-venv/bin/pip install -e . -c constraints/ci.txt
    /work/peers-venv/bin/pip install --no-deps OpenNMT-py==3.5.1 joeynmt==2.3.0
    /work/peers-venv/bin/pip install pyonmttok configargparse importlib_metadata tensorboard spacy pyahocorasick \\
        rapidfuzz fasttext-wheel sentencepiece subword-nmt sacremoses six

OpenNMT-py 3.5.1 declares torch<2.3 and Joey NMT 2.3.0 protobuf<3.21, but both import and run with torch 2.13.0 for
everything used here (`import onmt` pulls its data transforms, hence spacy, fasttext, rapidfuzz, ...).

    /work/peers-venv/bin/python benchmarks/bench_peers.py --tiny   # -> benchmarks/results/peers_tiny_cpu.json
    /work/peers-venv/bin/python benchmarks/bench_peers.py          # anchor size -> results/peers_anchor_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bench_common import machine_info, medians, time_rounds, write_json
from rnn_seq2seq_hf import RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration


@dataclass(frozen=True)
class Size:
    hidden: int  # decoder hidden size; the encoder has hidden / 2 per direction
    embedding: int
    vocab: int
    batch: int
    length: int
    layers: int
    beams: int


ANCHOR = Size(hidden=512, embedding=512, vocab=10_000, batch=64, length=20, layers=2, beams=5)
TINY = Size(hidden=32, embedding=32, vocab=100, batch=8, length=20, layers=2, beams=5)


@dataclass
class Batch:
    """One batch in the layouts the toolkits want. Token ids >= 4 are never special in any toolkit."""

    source: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, T]
    decoder_input_ids: torch.Tensor  # [B, T]: start token, labels[:, :-1]


class Toolkit:
    """One toolkit's model pair (with and without input feeding) and its training and decoding calls."""

    name: str

    def train_loss(self, input_feeding: bool, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def module(self, input_feeding: bool) -> nn.Module:
        raise NotImplementedError

    def decode(self, batch: Batch, steps: int, beams: int) -> object:
        raise NotImplementedError


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


# ---------------------------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------------------------


class Ours(Toolkit):
    name = "ours"

    def __init__(self, size: Size, device: torch.device):
        common = dict(
            vocab_size=size.vocab,
            embedding_size=size.embedding,
            hidden_size=size.hidden,
            encoder_layers=size.layers,
            decoder_layers=size.layers,
            cell_type="lstm",
            bidirectional_encoder=True,
            attention_type="general",
            bridge="last",
            embedding_dropout=0.0,
            hidden_dropout=0.0,
            output_dropout=0.0,
        )
        self.models = {
            feeding: RNNSeq2SeqForConditionalGeneration(RNNSeq2SeqConfig(**common, input_feeding=feeding)).to(device)
            for feeding in (False, True)
        }

    def module(self, input_feeding):
        return self.models[input_feeding]

    def train_loss(self, input_feeding, batch):
        model = self.models[input_feeding]
        return model(input_ids=batch.source, attention_mask=torch.ones_like(batch.source), labels=batch.labels).loss

    @torch.no_grad()
    def decode(self, batch, steps, beams):
        model = self.models[False]
        return model.generate(
            input_ids=batch.source,
            attention_mask=torch.ones_like(batch.source),
            max_new_tokens=steps,
            min_new_tokens=steps,
            num_beams=beams,
            do_sample=False,
        )


# ---------------------------------------------------------------------------------------------------------------
# OpenNMT-py
# ---------------------------------------------------------------------------------------------------------------


class OpenNMT(Toolkit):
    name = "OpenNMT-py"

    def __init__(self, size: Size, device: torch.device):
        with quiet():
            import onmt
            import pyonmttok
            from onmt.constants import DefaultTokens
            from onmt.decoders.decoder import InputFeedRNNDecoder, StdRNNDecoder
            from onmt.encoders.rnn_encoder import RNNEncoder
            from onmt.models.model import NMTModel
            from onmt.modules import Embeddings
            from onmt.translate import GNMTGlobalScorer, Translator

        self.version = onmt.__version__
        specials = [DefaultTokens.UNK, DefaultTokens.PAD, DefaultTokens.BOS, DefaultTokens.EOS]
        vocab = pyonmttok.build_vocab_from_tokens(
            [f"w{i}" for i in range(size.vocab - len(specials))], special_tokens=specials
        )
        assert len(vocab) == size.vocab
        self.vocabs = {"src": vocab, "tgt": vocab, "decoder_start_token": DefaultTokens.BOS}
        pad = vocab.lookup_token(DefaultTokens.PAD)
        self.models = {}
        for feeding in (False, True):
            encoder = RNNEncoder(
                "LSTM",
                bidirectional=True,
                num_layers=size.layers,
                hidden_size=size.hidden,
                dropout=0.0,
                embeddings=Embeddings(size.embedding, size.vocab, pad),
            )
            decoder_class = InputFeedRNNDecoder if feeding else StdRNNDecoder
            decoder = decoder_class(
                "LSTM",
                bidirectional_encoder=True,
                num_layers=size.layers,
                hidden_size=size.hidden,
                attn_type="general",
                dropout=0.0,
                embeddings=Embeddings(size.embedding, size.vocab, pad),
            )
            model = NMTModel(encoder, decoder)
            model.generator = nn.Linear(size.hidden, size.vocab)  # as onmt's model builder makes it
            # onmt's builder initialises uniformly in [-0.1, 0.1] (param_init default)
            for parameter in model.parameters():
                parameter.data.uniform_(-0.1, 0.1)
            self.models[feeding] = model.to(device)
        with quiet():  # onmt warns that alpha 0 means no length penalty, which is what is wanted
            scorer = GNMTGlobalScorer(alpha=0.0, beta=0.0, length_penalty="none", coverage_penalty="none")
        self.translators = {
            beams: Translator(
                self.models[False].eval(),
                self.vocabs,
                gpu=(device.index or 0) if device.type == "cuda" else -1,
                n_best=1,
                min_length=size.length,
                max_length=size.length,
                max_length_ratio=0,
                beam_size=beams,
                random_sampling_topk=1 if beams == 1 else 0,  # top-1 "sampling" is onmt's greedy search
                global_scorer=scorer,
                report_score=False,
            )
            for beams in (1, size.beams)
        }

    def module(self, input_feeding):
        return self.models[input_feeding]

    def train_loss(self, input_feeding, batch):
        model = self.models[input_feeding]
        source = batch.source[..., None]  # [B, S, 1]: onmt's word-feature axis
        target = torch.cat([batch.decoder_input_ids, batch.labels[:, -1:]], dim=1)[..., None]  # model drops last
        lengths = torch.full((batch.source.shape[0],), batch.source.shape[1], device=batch.source.device)
        outputs, _ = model(source, target, lengths)  # [B, T, H]
        return cross_entropy(model.generator(outputs), batch.labels)

    def decode(self, batch, steps, beams):
        source = batch.source[..., None]
        lengths = torch.full((source.shape[0],), source.shape[1], device=source.device)
        results = self.translators[beams].translate_batch({"src": source, "srclen": lengths}, attn_debug=False)
        return results["predictions"]


# ---------------------------------------------------------------------------------------------------------------
# Joey NMT
# ---------------------------------------------------------------------------------------------------------------


class Joey(Toolkit):
    name = "Joey NMT"

    def __init__(self, size: Size, device: torch.device):
        from types import SimpleNamespace

        with quiet():
            import joeynmt
            from joeynmt.model import build_model
            from joeynmt.vocabulary import Vocabulary

        self.version = joeynmt.__version__
        specials = SimpleNamespace(
            unk_token="<unk>",
            pad_token="<pad>",
            bos_token="<s>",
            eos_token="</s>",
            sep_token=None,
            lang_tags=[],
            unk_id=0,
            pad_id=1,
            bos_id=2,
            eos_id=3,
        )
        vocab = Vocabulary([f"w{i}" for i in range(size.vocab - 4)], specials)
        assert len(vocab) == size.vocab
        self.models = {}
        for feeding in (False, True):
            config = {
                "encoder": {
                    "type": "recurrent",
                    "rnn_type": "lstm",
                    "hidden_size": size.hidden // 2,
                    "embeddings": {"embedding_dim": size.embedding},
                    "num_layers": size.layers,
                    "bidirectional": True,
                    "dropout": 0.0,
                },
                "decoder": {
                    "type": "recurrent",
                    "rnn_type": "lstm",
                    "hidden_size": size.hidden,
                    "embeddings": {"embedding_dim": size.embedding},
                    "num_layers": size.layers,
                    "attention": "luong",
                    "input_feeding": feeding,
                    "init_hidden": "last",
                    "dropout": 0.0,
                    "hidden_dropout": 0.0,
                },
            }
            with quiet():
                self.models[feeding] = build_model(config, src_vocab=vocab, trg_vocab=vocab).to(device)
        self.size = size

    def module(self, input_feeding):
        return self.models[input_feeding]

    def _encode(self, model, source):
        lengths = torch.full((source.shape[0],), source.shape[1], device=source.device)
        mask = torch.ones_like(source, dtype=torch.bool)[:, None, :]  # [B, 1, S]
        memory, final, _, _ = model(return_type="encode", src=source, src_length=lengths, src_mask=mask)
        return memory, final, mask

    def train_loss(self, input_feeding, batch):
        model = self.models[input_feeding]
        memory, final, mask = self._encode(model, batch.source)
        logits, _, _, _ = model(
            return_type="decode",
            encoder_output=memory,
            encoder_hidden=final,
            src_mask=mask,
            trg_input=batch.decoder_input_ids,
            unroll_steps=batch.decoder_input_ids.shape[1],
        )
        return cross_entropy(logits, batch.labels)

    def decode(self, batch, steps, beams):
        from joeynmt.search import beam_search, greedy

        model = self.models[False].eval()
        with torch.no_grad():
            memory, final, mask = self._encode(model, batch.source)
            if beams == 1:
                return greedy(mask, steps, model, memory, final, min_output_length=steps)
            return beam_search(model, beams, memory, final, mask, steps, alpha=0.0, min_output_length=steps)


# ---------------------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet():
    """Silence the peers' import-time warnings and log lines (deprecated torch APIs, model summaries)."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.INFO)
        try:
            yield
        finally:
            logging.disable(level)


def build_toolkits(size: Size, device: torch.device, wanted: list[str]) -> tuple[list[Toolkit], dict[str, str]]:
    """Ours always; each peer if it imports and builds, else the reason it was skipped."""
    toolkits: list[Toolkit] = []
    skipped: dict[str, str] = {}
    for cls in (Ours, OpenNMT, Joey):
        if cls is not Ours and cls.name not in wanted:
            skipped[cls.name] = "not asked for (--peers)"
            continue
        torch.manual_seed(0)
        try:
            toolkits.append(cls(size, device))
        except ImportError as error:
            skipped[cls.name] = f"not importable: {error}"
        except Exception as error:  # noqa: BLE001 - a peer that breaks on this torch is a result, not a crash
            skipped[cls.name] = f"failed to build: {type(error).__name__}: {error}"
    return toolkits, skipped


def training_step(toolkit: Toolkit, input_feeding: bool, batch: Batch) -> Callable[[], None]:
    module = toolkit.module(input_feeding)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)

    def step() -> None:
        module.train()
        optimizer.zero_grad(set_to_none=True)
        toolkit.train_loss(input_feeding, batch).backward()
        optimizer.step()

    return step


def parameter_counts(toolkits: list[Toolkit]) -> dict[str, dict[str, int]]:
    """Parameters of every toolkit's two models, so a reader can check that the sizes match."""
    return {
        t.name: {
            "no input feeding": sum(p.numel() for p in t.module(False).parameters()),
            "input feeding": sum(p.numel() for p in t.module(True).parameters()),
        }
        for t in toolkits
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="hidden 32, vocabulary 100, batch 8 (default: anchor)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; tiny: 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=None, help="calls per round (default 1 anchor, 5 tiny)")
    parser.add_argument("--peers", default="OpenNMT-py,Joey NMT", help="comma-separated peers to try")
    parser.add_argument(
        "--rows",
        default=None,
        help="rows to run, separated by ';' (row names contain commas), e.g. 'train, no input feeding': default all",
    )
    parser.add_argument("--output", default=None)
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. the machine's load)")
    args = parser.parse_args()

    device = torch.device(args.device)
    size = TINY if args.tiny else ANCHOR
    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    repeats = args.repeats or (5 if args.tiny else 1)
    size_name = "tiny" if args.tiny else "anchor"
    output = args.output or f"benchmarks/results/peers_{size_name}_{device.type}.json"

    machine = machine_info(device)  # before the runs, so that its load average is the one at the start
    toolkits, skipped = build_toolkits(size, device, [name.strip() for name in args.peers.split(",")])
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(4, size.vocab, (size.batch, size.length), generator=generator).to(device)
    batch = Batch(
        source=torch.randint(4, size.vocab, (size.batch, size.length), generator=generator).to(device),
        labels=labels,
        # the peers' start token is 2 in both vocabularies built here; ours shifts the labels itself
        decoder_input_ids=torch.cat([torch.full_like(labels[:, :1], 2), labels[:, :-1]], dim=1),
    )

    rows = {
        "train, no input feeding": lambda t: training_step(t, False, batch),
        "train, input feeding": lambda t: training_step(t, True, batch),
        "greedy, 20 steps": lambda t: lambda: t.decode(batch, size.length, 1),
        f"beam {size.beams}, 20 steps": lambda t: lambda: t.decode(batch, size.length, size.beams),
    }
    if args.rows:
        wanted_rows = [name.strip() for name in args.rows.split(";")]
        unknown = sorted(set(wanted_rows) - set(rows))
        if unknown:
            parser.error(f"--rows: unknown rows {unknown}; the rows are {list(rows)}")
        rows = {row: make for row, make in rows.items() if row in wanted_rows}
    variants = {(row, t.name): make(t) for row, make in rows.items() for t in toolkits}
    names = [t.name for t in toolkits]

    def rotated(round_index: int) -> list[str]:
        # within each row the toolkits take turns to go first, so that none always runs right after another row's
        # work (at the anchor size a decoding run allocates and frees hundreds of megabytes)
        turn = round_index % len(names)
        return [f"{row} | {name}" for row in rows for name in names[turn:] + names[:turn]]

    samples = time_rounds(
        {f"{row} | {name}": fn for (row, name), fn in variants.items()}, args.rounds, device, repeats, rotated
    )
    seconds = medians(samples)

    table: dict[str, dict] = {}
    tokens = size.batch * size.length
    for row in rows:
        ours = seconds[f"{row} | ours"]
        table[row] = {}
        for toolkit in toolkits:
            value = seconds[f"{row} | {toolkit.name}"]
            entry = {"seconds": value, "seconds_samples": samples[f"{row} | {toolkit.name}"]}
            if row.startswith("train"):
                entry["target_tokens_per_second"] = tokens / value
            if toolkit.name != "ours":
                entry["ours_over_peer_time"] = ours / value
            table[row][toolkit.name] = entry

    results = {
        "machine": machine,
        "setup": {"size": size_name, **asdict(size), "rounds": args.rounds, "repeats": repeats},
        "note": args.note,
        "peers": {t.name: getattr(t, "version", None) for t in toolkits if t.name != "ours"},
        "skipped": skipped,
        "parameters": parameter_counts(toolkits),
        "table": table,
    }
    print(f"device {results['machine']['device_name']}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"size {size_name}: {size}; peers {results['peers']}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    for name, counts in results["parameters"].items():
        print(f"parameters {name}: {counts['no input feeding']:,} / {counts['input feeding']:,} (with input feeding)")
    print(f"\n  {'row':<26}" + "".join(f"{name:>14}" for name in names) + "   ours / peer (time)")
    for row, entries in table.items():
        cells = []
        for name in names:
            entry = entries[name]
            cells.append(
                f"{entry['target_tokens_per_second']:>10.0f} t/s"
                if row.startswith("train")
                else f"{entry['seconds'] * 1e3:>11.1f} ms"
            )
        ratios = ", ".join(f"{name} {entries[name]['ours_over_peer_time']:.2f}" for name in names if name != "ours")
        print(f"  {row:<26}" + "".join(f"{cell:>14}" for cell in cells) + f"   {ratios}")
    print(f"\nwrote {write_json(output, results)}")


if __name__ == "__main__":
    main()
