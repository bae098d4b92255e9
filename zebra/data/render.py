"""Chat rendering with the tokenizer's template, and the character spans of assistant contents (for loss masks).

- `ChatRenderer(tok)(messages)`: the template compiled once and rendered directly (checked against
  `apply_chat_template` on the first call).
- `_render_with_spans(render, conv, specials, stats)`: (text, sorted character spans of each assistant content
  plus its end-of-turn token). How, for any template: every message content is replaced by a unique sentinel and
  the conversation rendered once; the sentinels' places give each content's span, and the real rendering must
  equal the template text with the contents put back (checked per conversation, also with stripped contents for
  templates that `trim`). Where that check fails (templates that rewrite contents), prefixes messages[:k] are
  rendered incrementally (with and without the generation prompt) and diffed to bound each message, and the
  content is searched inside its bounds.
- `_plain_fallback_text(conv)`: "role: content" text for tokenizers without a chat template.

zebra.data.corpus turns the spans into token masks (through the fast tokenizer's offsets).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

_SENT_OPEN, _SENT_CLOSE = "\U000f0000", "\U000f0001"  # private-use code points: never in real text


def _compile_template(template: str):
    """The template compiled the way transformers compiles it (its private helper when present, so the
    sandbox, filters and `{% generation %}` tag match exactly), else an equivalent own environment."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(template)
    except ImportError:
        pass
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


class ChatRenderer:
    """Renders messages to text with a tokenizer's chat template, fast: the template is compiled once and
    rendered directly (apply_chat_template costs ~10x more per call). The first rendering is compared with
    `tok.apply_chat_template`; on any difference every later call goes through apply_chat_template."""

    def __init__(self, tok):
        self.tok = tok
        self.template = getattr(tok, "chat_template", None) or None
        if isinstance(self.template, dict):  # several named templates: the default one
            self.template = self.template.get("default") or next(iter(self.template.values()))
        self._compiled = None
        self._checked = False
        if self.template:
            try:
                self._compiled = _compile_template(self.template)
            except Exception:
                self._compiled = None  # apply_chat_template will say what is wrong
        self._kwargs = dict(getattr(tok, "special_tokens_map", {}) or {})

    def _slow(self, messages, add_generation_prompt):
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self._compiled is None:
            return self._slow(messages, add_generation_prompt)
        text = self._compiled.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self._kwargs)
        if not self._checked:
            self._checked = True
            if text != self._slow(messages, add_generation_prompt):
                self._compiled = None
                return self._slow(messages, add_generation_prompt)
        return text


def _special_strings(tok) -> list[str]:
    """Special-token strings, longest first (so `<|im_end|>` wins over any shorter prefix)."""
    out = set(getattr(tok, "all_special_tokens", []) or [])
    for t in (getattr(tok, "added_tokens_decoder", {}) or {}).values():
        if getattr(t, "special", False):
            out.add(str(t))
    return sorted((s for s in out if s), key=len, reverse=True)


def _end_of_turn_strings(tok, render) -> list[str]:
    """Special tokens that may close an assistant turn: all of them except those that open one (found in
    what the generation prompt appends, e.g. `<|im_start|>` or `<|start_header_id|>`), so a template
    with no end-of-turn token never gets the next turn's opening token masked instead."""
    specials = _special_strings(tok)
    if render is None:
        return specials
    probe = [{"role": "user", "content": "x"}]
    try:
        base, gen = render(probe), render(probe, add_generation_prompt=True)
    except Exception:
        return specials
    opener = gen[len(base):] if gen.startswith(base) else gen
    return [s for s in specials if s not in opener]


def _end_of_turn(text: str, start: int, stop: int, specials: Sequence[str]) -> int:
    """End (exclusive) of the end-of-turn token right after an assistant content ending at `start`:
    optional whitespace then a special token, looked for before `stop`; `start` itself when there is none."""
    j = start
    while j < stop and text[j] in " \t\r\n":
        j += 1
    for s in specials:
        if text.startswith(s, j) and j + len(s) <= stop:
            return j + len(s)
    return start


@dataclass
class SpanStats:
    """How assistant spans were found (sentinel = exact, prefix = incremental-prefix fallback,
    unlocated = content not found in its bounds: the whole message span was masked)."""
    sentinel: int = 0
    prefix: int = 0
    unlocated: int = 0
    plain: int = 0


def _render_with_spans(render: ChatRenderer, conv: list[dict], specials, stats: SpanStats) -> tuple[str, list]:
    """(full text, sorted list of (start, end) character spans of assistant content + end-of-turn)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in conv]
    full = render(msgs)
    asst = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    if not asst:
        return full, []
    if not any(_SENT_OPEN in m["content"] or _SENT_CLOSE in m["content"] for m in msgs):
        spans = _sentinel_spans(render, msgs, full, specials)
        if spans is not None:
            stats.sentinel += 1
            return full, spans
    stats.prefix += 1
    return full, _prefix_spans(render, msgs, full, specials, stats)


def _sentinel_spans(render, msgs, full, specials):
    marked = [dict(m, content=f"{_SENT_OPEN}{k}{_SENT_CLOSE}") for k, m in enumerate(msgs)]
    try:
        skeleton = render(marked)
    except Exception:
        return None
    pieces, places, pos = [], [], 0
    for k in range(len(msgs)):
        tag = f"{_SENT_OPEN}{k}{_SENT_CLOSE}"
        at = skeleton.find(tag, pos)
        if at < 0 or skeleton.count(tag) != 1:
            return None  # the template dropped or repeated a content
        pieces.append(skeleton[pos:at])
        places.append(k)
        pos = at + len(tag)
    tail = skeleton[pos:]
    for strip in (False, True):
        out, where, cur = [], [], 0
        for piece, k in zip(pieces, places):
            content = msgs[k]["content"].strip() if strip else msgs[k]["content"]
            out.append(piece)
            cur += len(piece)
            where.append((cur, cur + len(content)))
            out.append(content)
            cur += len(content)
        out.append(tail)
        if "".join(out) == full:
            # an end-of-turn token lies in the template text between this content and the next one
            stops = [w[0] for w in where[1:]] + [len(full)]
            return [(a, _end_of_turn(full, b, stop, specials))
                    for k, ((a, b), stop) in enumerate(zip(where, stops)) if msgs[k]["role"] == "assistant"]
    return None


def _locate(full: str, content: str, lo: int, hi: int, specials) -> int:
    """Where `content` starts inside full[lo:hi], or -1. The message's own text is the last thing before its
    end-of-turn token, so the last occurrence followed by one wins (a short content may also occur in the
    header or a default system prompt); without end-of-turn tokens, the first occurrence."""
    first, best, at = -1, -1, full.find(content, lo, hi)
    while at >= 0:
        first = at if first < 0 else first
        end = at + len(content)
        if _end_of_turn(full, end, hi, specials) > end:
            best = at
        at = full.find(content, at + 1, hi)
    return best if best >= 0 else first


def _prefix_spans(render, msgs, full, specials, stats: SpanStats):
    """Fallback for templates that rewrite contents: bound message k by the renderings of messages[:k] and
    messages[:k+1] (each must be a prefix of the full rendering), skip the assistant header given by the
    generation prompt, and find the content inside; where prefixes are not stable, search from a cursor."""
    spans, cursor = [], 0
    prefix_len = {}

    def plen(k: int, gen: bool = False) -> int | None:
        key = (k, gen)
        if key not in prefix_len:
            try:
                text = render(msgs[:k], add_generation_prompt=gen) if k or gen else ""
            except Exception:
                text = None
            prefix_len[key] = len(text) if text is not None and full.startswith(text) else None
        return prefix_len[key]

    for k, m in enumerate(msgs):
        lo, hi = plen(k), plen(k + 1)
        if lo is None or hi is None or hi < lo:
            lo, hi = cursor, len(full)
        lo = max(lo, cursor)
        if m["role"] == "assistant":
            g = plen(k, True)
            if g is not None and lo <= g <= hi:
                lo = g
        content = m["content"]
        at = _locate(full, content, lo, hi, specials)
        if at < 0 and content.strip() != content:
            content = content.strip()
            at = _locate(full, content, lo, hi, specials)
        if at < 0:
            if m["role"] == "assistant":
                stats.unlocated += 1
                spans.append((lo, hi))
            cursor = max(cursor, lo)
            continue
        end = at + len(content)
        if m["role"] == "assistant":
            spans.append((at, _end_of_turn(full, end, hi, specials)))
        cursor = end
    return spans


def _plain_fallback_text(conv: list[dict]) -> tuple[str, list]:
    """No chat template: the same "role: content" text as zebra.data.chat.render, with assistant spans."""
    parts, spans, cur = [], [], 0
    for i, m in enumerate(conv):
        head = ("\n\n" if i else "") + f"{m['role']}: "
        parts += [head, m["content"]]
        cur += len(head)
        if m["role"] == "assistant":
            spans.append((cur, cur + len(m["content"])))
        cur += len(m["content"])
    return "".join(parts), spans
