"""Human-written short texts in a realistic IM envelope: the archive benchmarks' corpus.

Texts: Debian's ``fortunes`` (English, /usr/share/games/fortunes/*.u8 and the
plain files without a .u8 twin) and ``fortunes-zh`` (Chinese: ``chinese``,
``tang300``, ``song100``).  ``./dev bench`` installs both packages when they
are missing (apt-get).  Each fortune becomes one message text:

- ANSI colour escapes (fortunes-zh colours titles and authors) and the
  backspace overstriking of a few old English fortunes are removed,
  trailing blanks stripped;
- a fortune longer than :data:`MAX_TEXT` bytes (a poem, a story) is cut at
  line boundaries into several messages of at most that size, as a user
  pastes a long text in pieces;
- **no text appears twice**: exact duplicates (the same fortune in two
  files, a repeated line of a cut poem) are dropped, first one kept.

The unique texts are shuffled with a fixed seed (so no conversation gets
the thematically related neighbours of one fortune file: the pessimistic
choice for compression) and split: :data:`HELD_OUT` of them (10 %) are held
out for dictionary training, the rest are the measured set.  A dictionary
measured here is therefore trained on texts that are not in what it
compresses (the issue's "honest ratio").

Envelope (:func:`month_of_traffic`): one calendar month of traffic among
``users`` users with realistic ids (random 40-bit numbers), each in a few
1:1 conversations and a few groups (3-30 members); 70 % of messages in 1:1
chats.  Messages come in bursts (1-8 messages seconds apart in one
conversation, the sender alternating); burst starts are spread over the
month.  Each message is delivered to every member of its conversation
(the sender included, as ``deliver(..., to=[sender, peer])`` does) and gets
the store's fields: a time-ordered ``msg_id`` (syncstore's layout: ms since
2020, replica id, sequence), ``client_seq`` counting per sender, ``ts_ms``
the client's clock (0-3 s before delivery, 1 % of clients minutes off),
``priority`` 0 (2 % at 1), and per recipient the next cursor of that user
(users start the month at a random head, as after earlier months).
"""

from __future__ import annotations

import calendar
import glob
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

from syncstore.model import MessageRecord

FORTUNE_DIR = "/usr/share/games/fortunes"
ZH_FILES = ("chinese", "tang300", "song100")
LANGUAGES = ("en", "zh")
MAX_TEXT = 1024  # bytes (UTF-8) of one message text; longer fortunes are sent in pieces
HELD_OUT = 0.10  # fraction of unique texts kept out of the measured set, for dictionary training
SPLIT_SEED = 20240101
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_OVERSTRIKE = re.compile(r".\x08")
EPOCH_MS = 1_577_836_800_000  # syncstore._ids: msg_id time is ms since 2020-01-01T00:00:00Z


class CorpusMissing(RuntimeError):
    """The fortunes packages are not installed (``./dev bench`` installs them)."""


def _files(language: str) -> list[str]:
    if language == "zh":
        paths = [os.path.join(FORTUNE_DIR, name) for name in ZH_FILES]
    elif language == "en":
        paths = []
        for path in sorted(glob.glob(os.path.join(FORTUNE_DIR, "*"))):
            name = os.path.basename(path)
            if name.endswith(".dat") or "." in name or name in ZH_FILES or os.path.isdir(path):
                continue
            paths.append(path + ".u8" if os.path.exists(path + ".u8") else path)  # the UTF-8 twin where there is one
    else:
        raise ValueError(f"language is one of {LANGUAGES}, got {language!r}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        package = "fortunes-zh" if language == "zh" else "fortunes"
        raise CorpusMissing(f"the {package} package is not installed (missing {missing or FORTUNE_DIR}): apt-get install -y {package}")
    return paths


def _pieces(text: str) -> Iterator[str]:
    """``text`` whole if it fits MAX_TEXT bytes, else cut at line ends into pieces that do (a longer line is cut at a character)."""
    if len(text.encode("utf-8")) <= MAX_TEXT:
        yield text
        return
    piece: list[str] = []
    size = 0
    for line in text.split("\n"):
        while len(line.encode("utf-8")) > MAX_TEXT:  # one overlong line: cut by characters
            cut = len(line)
            while len(line[:cut].encode("utf-8")) > MAX_TEXT:
                cut = cut * 3 // 4
            if piece:
                yield "\n".join(piece).strip()
                piece, size = [], 0
            yield line[:cut]
            line = line[cut:]
        length = len(line.encode("utf-8")) + 1
        if size + length > MAX_TEXT and piece:
            yield "\n".join(piece).strip()
            piece, size = [], 0
        piece.append(line)
        size += length
    if piece and "\n".join(piece).strip():
        yield "\n".join(piece).strip()


@lru_cache(maxsize=None)
def unique_texts(language: str) -> tuple[bytes, ...]:
    """Every distinct message text of ``language``'s fortunes, UTF-8, in file order (see the module docstring)."""
    seen: set[bytes] = set()
    texts: list[bytes] = []
    for path in _files(language):
        with open(path, encoding="utf-8", errors="replace") as f:
            content = f.read()
        for fortune in re.split(r"^%\n", content, flags=re.MULTILINE):
            cleaned = _OVERSTRIKE.sub("", _ANSI.sub("", fortune))
            cleaned = "\n".join(line.rstrip() for line in cleaned.split("\n")).strip()
            for piece in _pieces(cleaned):
                data = piece.encode("utf-8")
                if data and data not in seen:
                    seen.add(data)
                    texts.append(data)
    return tuple(texts)


@lru_cache(maxsize=None)
def split(language: str) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """(held-out texts for dictionary training, measured texts): disjoint, shuffled with a fixed seed."""
    texts = list(unique_texts(language))
    random.Random(SPLIT_SEED).shuffle(texts)
    cut = int(len(texts) * HELD_OUT)
    return tuple(texts[:cut]), tuple(texts[cut:])


@dataclass(frozen=True, slots=True)
class Delivered:
    """One message of the month as the store holds it: the message and each recipient's cursor."""

    message: MessageRecord  # msg_id, sender, conv, client_seq, ts_ms, priority, body
    pairs: tuple[tuple[int, int], ...]  # (user, cursor) per recipient, sender included
    delivered_ms: int  # the store's clock when it was sequenced (Unix ms): decides the month


def month_bounds(year: int, month: int) -> tuple[int, int]:
    """[start, end) of a UTC calendar month in Unix ms."""
    start = calendar.timegm((year, month, 1, 0, 0, 0)) * 1000
    days = calendar.monthrange(year, month)[1]
    return start, start + days * 86_400_000


def month_of_traffic(
    texts: Sequence[bytes],
    *,
    users: int = 2_000,
    year: int = 2026,
    month: int = 3,
    replica_id: int = 1,
    seed: int = 7,
) -> list[Delivered]:
    """Each text of ``texts`` sent once, as one message of a month of IM traffic (module docstring); in delivery order."""
    rng = random.Random(seed)
    ids = rng.sample(range(1 << 30, 1 << 40), users)
    groups = [tuple(rng.sample(ids, rng.randint(3, 30))) for _ in range(max(1, users // 10))]
    pairs: list[tuple[int, ...]] = []
    for index, uid in enumerate(ids):  # each user starts 3 chats with random others: ~6 partners each
        for _ in range(3):
            other = ids[(index + 1 + rng.randrange(users - 1)) % users]
            pairs.append((uid, other))
    convs: list[tuple[int, tuple[int, ...]]] = [(rng.randrange(1 << 40, 1 << 48), members) for members in pairs]
    convs += [(rng.randrange(1 << 48, 1 << 56), members) for members in groups]
    one_to_one = len(pairs)
    start, end = month_bounds(year, month)
    # Bursts: (start ms, conv index, message count); 70 % of messages in 1:1 chats.
    plan: list[tuple[int, int, int]] = []
    left = len(texts)
    while left:
        count = min(left, rng.randint(1, 8))
        conv = rng.randrange(one_to_one) if rng.random() < 0.7 else one_to_one + rng.randrange(len(groups))
        plan.append((rng.randrange(start, end - 60_000), conv, count))
        left -= count
    sends: list[tuple[int, int, int]] = []  # (delivered ms, conv index, position within its burst)
    for at, conv, count in plan:
        for position in range(count):
            at += rng.randint(500, 20_000)
            sends.append((min(at, end - 1), conv, position))
    sends.sort()
    heads = {uid: rng.randrange(0, 5_000) for uid in ids}
    client_seqs = {uid: rng.randrange(0, 100_000) for uid in ids}
    skewed = set(rng.sample(ids, max(1, users // 100)))
    out: list[Delivered] = []
    last_ms, sequence = -1, 0
    burst_sender: dict[int, int] = {}
    for (at, conv, position), body in zip(sends, texts):
        conv_id, members = convs[conv]
        if position == 0 or conv not in burst_sender:
            sender = rng.choice(members)
        elif len(members) == 2:  # a 1:1 burst alternates, mostly
            sender = members[0] if burst_sender[conv] == members[1] else members[1] if rng.random() < 0.7 else burst_sender[conv]
        else:
            sender = burst_sender[conv] if rng.random() < 0.4 else rng.choice(members)
        burst_sender[conv] = sender
        sequence = sequence + 1 if at == last_ms else 0
        last_ms = at
        msg_id = ((at - EPOCH_MS) << 22) | (replica_id << 12) | sequence
        client_seqs[sender] += 1
        lag = rng.randint(0, 3_000) + (rng.randint(-600_000, 600_000) if sender in skewed else 0)
        recipients = []
        for uid in sorted(set(members)):
            heads[uid] += 1
            recipients.append((uid, heads[uid]))
        message = MessageRecord(msg_id, sender, conv_id, client_seqs[sender], at - lag, 1 if rng.random() < 0.02 else 0, body)
        out.append(Delivered(message, tuple(recipients), at))
    return out


def describe(language: str) -> str:
    """One line for docs and benchmark tables: how many texts, their sizes, the split."""
    held, measured = split(language)
    sizes = sorted(len(t) for t in measured)
    return (
        f"{language}: {len(unique_texts(language)):,} unique texts ({len(measured):,} measured, {len(held):,} held out), "
        f"median {sizes[len(sizes) // 2]} B, mean {sum(sizes) / len(sizes):.0f} B, {sum(sizes) / 1e6:.2f} MB measured"
    )


if __name__ == "__main__":
    for lang in LANGUAGES:
        print(describe(lang))
