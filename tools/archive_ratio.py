"""Compression of archive segments on the fortunes corpus: block size x zstd level x dictionary, per language.

    .venv/bin/python tools/archive_ratio.py               # the full table (a few minutes), Markdown
    .venv/bin/python tools/archive_ratio.py --quick       # the chosen options and its neighbours only

One month of traffic per language (``bench/_corpus.py``: every measured text
once, in the IM envelope), encoded with the real segment encoder
(``syncstore._segformat.encode_segment``).  Dictionaries are trained on the
held-out texts (never on the measured ones) and their bytes are counted in
the segment.  Columns:

- **ratio**: hot-state bytes / segment bytes, where hot-state bytes are the
  LMDB items these messages occupy in state format 3 without B-tree
  overhead: per message 8 (key) + 37 (head) + body, per inbox entry 16
  (inbox) + 8 (history).  What archiving saves, as a lower bound (LMDB's
  pages add their own overhead: ~767 B per 1:1 message on disk).
- **msg ratio**: (45 + body) per message / the messages section's compressed
  bytes: how well the texts themselves compress (the language-dependent part).
- **B/msg**: segment bytes per message; **encode**: messages/s of
  ``encode_segment``; **block µs**: mean time to decompress and decode one
  messages block (what a cold read pays per block it needs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import _corpus  # noqa: E402

from syncstore import _segformat as fmt  # noqa: E402
from syncstore.model import MessageRecord  # noqa: E402

BLOCKS = (4096, 8192, 16384, 65536)
LEVELS = (3, 9, 19)
DICTS = (0, 8192, 32768)


def month(language: str) -> tuple[list[MessageRecord], list[fmt.Entry], int, int]:
    """The measured month: messages, entries, hot-state bytes, (45 + body) bytes."""
    _held, measured = _corpus.split(language)
    delivered = _corpus.month_of_traffic(measured)
    messages = [d.message for d in delivered]
    entries = [fmt.Entry(user, cursor, d.message.msg_id) for d in delivered for user, cursor in d.pairs]
    message_bytes = sum(45 + len(m.body) for m in messages)
    return messages, entries, message_bytes + 24 * len(entries), message_bytes


def measure(messages: list[MessageRecord], entries: list[fmt.Entry], options: fmt.Options) -> dict[str, float]:
    start = time.perf_counter()
    data = b"".join(fmt.encode_segment(2026, 3, messages, entries, options))
    seconds = time.perf_counter() - start
    header = fmt.decode_header(data)
    footer = fmt.decode_footer(data[-fmt.FOOTER_SIZE :], len(data), header)
    index = fmt.decode_index(data[footer.index_offset : -fmt.FOOTER_SIZE], footer, header)
    blocks = index.sections[fmt.MESSAGES]
    decompressor = fmt.decompressor_for(options.dictionary)
    start = time.perf_counter()
    for number, ref in enumerate(blocks):
        raw = fmt.decompress_block(data[ref.offset : ref.offset + ref.compressed], ref, decompressor)
        fmt.decode_messages(raw, ref, fmt.next_key(index, fmt.MESSAGES, number))
    decode_us = (time.perf_counter() - start) / len(blocks) * 1e6
    return {"bytes": len(data), "messages C": sum(r.compressed for r in blocks), "encode msg/s": len(messages) / seconds, "block us": decode_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only 8 KiB blocks (every level and dictionary)")
    args = parser.parse_args()
    blocks = (8192,) if args.quick else BLOCKS
    for language in _corpus.LANGUAGES:
        messages, entries, hot, message_bytes = month(language)
        held, _ = _corpus.split(language)
        print(f"\n#### {_corpus.describe(language)}; {len(entries):,} inbox entries ({len(entries) / len(messages):.2f} per message)\n")
        print("| block | level | dictionary | ratio | msg ratio | B/msg | encode msg/s | block µs |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for block in blocks:
            for level in LEVELS:
                for size in DICTS:
                    dictionary = fmt.train_dictionary(held, size) if size else None
                    if size and dictionary is None:
                        continue
                    got = measure(messages, entries, fmt.Options(block, level, dictionary))
                    print(
                        f"| {block // 1024} KiB | {level} | {f'{size // 1024} KiB' if size else 'none'} | {hot / got['bytes']:.2f} | "
                        f"{message_bytes / got['messages C']:.2f} | {got['bytes'] / len(messages):.0f} | {got['encode msg/s']:,.0f} | {got['block us']:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
