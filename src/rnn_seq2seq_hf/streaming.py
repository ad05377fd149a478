"""Reading sentences from a stream as they arrive, in chunks, for `rnn-seq2seq translate`.

A translation command in a pipe (`producer | rnn-seq2seq translate | consumer`) should not wait for its input to
end: it translates what has arrived, writes it, and goes on. A background thread reads lines (blocking) into a
queue; the consumer takes one line (waiting for it), then whatever else arrives within a short wait, up to a chunk
size. A file or a fast pipe thus gives full chunks (batched by length, fast), a slow writer or a person at a
terminal gets each line translated as soon as it is complete.

Lines are decoded as UTF-8 one by one, so bad bytes are reported with their line number, after the lines before
them have been handed out. A UTF-8 byte-order mark at the start of the stream is dropped.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import BinaryIO

BOM = "\ufeff"
_END = object()


class InputError(ValueError):
    """Input that is not text we can translate; the message names the input and the line."""


def _decode(raw: bytes, name: str, number: int) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(
            f"{name}:{number}: not valid UTF-8 ({error.reason} at byte {error.start} of the line); "
            "give UTF-8 text, one sentence per line"
        ) from None
    if number == 1 and line.startswith(BOM):
        line = line[1:]
    return line.rstrip("\n").rstrip("\r")


def _reader(stream: BinaryIO, name: str, lines: queue.Queue) -> None:
    try:
        for number, raw in enumerate(stream, start=1):
            lines.put(_decode(raw, name, number))
    except Exception as error:  # handed to the consumer, which raises it after the lines before it
        lines.put(error)
    lines.put(_END)


def read_line_chunks(stream: BinaryIO, name: str, max_lines: int, wait: float = 0.05) -> Iterator[list[str]]:
    """Yield the lines of a binary `stream` (without line endings) in chunks of 1 to `max_lines` lines.

    A chunk is handed out when it is full, when the stream ends, or when no further line arrived within `wait`
    seconds after the last one. Raises `InputError` (naming `name` and the line number) at the first line that is
    not UTF-8, after yielding the lines before it.
    """
    if max_lines < 1:
        raise ValueError(f"max_lines must be >= 1, got {max_lines}")
    lines: queue.Queue = queue.Queue(maxsize=4 * max_lines)  # bounded: a huge file is not read into memory at once
    threading.Thread(target=_reader, args=(stream, name, lines), daemon=True).start()
    finished = False
    while not finished:
        chunk: list[str] = []
        item = lines.get()
        while True:
            if item is _END:
                finished = True
                break
            if isinstance(item, Exception):
                if chunk:
                    yield chunk
                raise item
            chunk.append(item)
            if len(chunk) >= max_lines:
                break
            try:
                item = lines.get(timeout=wait)
            except queue.Empty:
                break
        if chunk:
            yield chunk


__all__ = ["InputError", "read_line_chunks"]
