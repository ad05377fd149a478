"""read_line_chunks: lines are handed out as they arrive, decoded and checked line by line."""

import io
import os

import pytest

from rnn_seq2seq_hf.streaming import InputError, read_line_chunks


def test_chunks_keep_every_line_in_order_and_strip_endings_and_the_byte_order_mark():
    data = "\ufeffeins\r\nzwei\n\ndrei".encode() + b"\n" + "".join(f"{i}\n" for i in range(10)).encode()
    chunks = list(read_line_chunks(io.BytesIO(data), "input", max_lines=4))
    assert all(1 <= len(chunk) <= 4 for chunk in chunks)
    assert [line for chunk in chunks for line in chunk] == ["eins", "zwei", "", "drei"] + [str(i) for i in range(10)]


def test_bad_bytes_are_reported_with_their_line_after_the_lines_before_them():
    data = b"eins\nzwei\n\xff\xfedrei\nvier\n"
    chunks = read_line_chunks(io.BytesIO(data), "stdin", max_lines=10)
    assert next(chunks) == ["eins", "zwei"]
    with pytest.raises(InputError, match=r"^stdin:3: not valid UTF-8 \(invalid start byte at byte 0 of the line\)"):
        next(chunks)


def test_lines_of_a_slow_writer_come_out_before_the_input_ends():
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as reader, os.fdopen(write_end, "wb", buffering=0) as writer:
        chunks = read_line_chunks(reader, "pipe", max_lines=100, wait=0.5)
        writer.write(b"one\ntwo\n")
        assert next(chunks) == ["one", "two"]  # the pipe is still open: nothing waits for its end
        writer.write(b"three\n")
        assert next(chunks) == ["three"]
        writer.close()
        assert list(chunks) == []
