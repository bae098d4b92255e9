"""Out-of-core data at scale (issue 11): `zebra prepare` of a large plain-text corpus on this machine, measured.

Writes a JSONL source of about --tokens tokens ({"text": ...} per line, the ShareGPT turns' text repeated with a
running counter so no two documents are equal; no evaluation data), a `zebra run` config that reads it, then runs

    ZEBRA_CACHE=OUT/cache zebra prepare OUT/config.yaml --loss-on all

as a child process and records what it did: documents, tokens, seconds, tokens/s, the child's peak resident memory
(getrusage of the waited child), the shard files on disk, and the progress lines it printed. The finished cache is
then mapped back (ShardedCorpus) and its last document read, timing what a run pays to open it.

    python tools/prepare_scale.py --tokens 1e9 --out /tmp/prep --json results/prepare-cpu/prepare.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def write_corpus(path: Path, target_tokens: float, chars_per_token: float = 4.2) -> dict:
    """ShareGPT message texts, one JSONL document of ~4k characters each, until ~target_tokens tokens."""
    from zebra.data.sources import load_conversations

    texts = []
    for conv in load_conversations({"type": "sharegpt", "render": "chat"}):
        for m in conv:
            t = m.get("content") if isinstance(m, dict) else None
            if isinstance(t, str) and len(t) > 200:
                texts.append(t)
        if len(texts) >= 20000:
            break
    if not texts:
        raise SystemExit("no ShareGPT text found (run `zebra assets fetch`)")
    want = int(target_tokens * chars_per_token)
    written, docs, i = 0, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        doc = []
        size = 0
        while written < want:
            t = texts[i % len(texts)]
            doc.append(f"[{i}] {t}")
            size += len(t)
            i += 1
            if size >= 4000:
                line = json.dumps({"text": "\n\n".join(doc)}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line)
                docs += 1
                doc, size = [], 0
    return {"bytes": path.stat().st_size, "docs": docs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=float, default=1e9, help="approximate tokens of text to prepare")
    ap.add_argument("--out", default="/tmp/zebra-prepare-scale")
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and the shards")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "text.jsonl"
    t0 = time.perf_counter()
    corpus = write_corpus(src, args.tokens)
    write_s = time.perf_counter() - t0
    print(f"wrote {corpus['bytes'] / 1e9:.2f} GB, {corpus['docs']:,} documents in {write_s:.0f}s", flush=True)
    cfg = out / "config.yaml"
    cfg.write_text(f"name: prepare-scale\nbase: smollm2-135m-instruct\ndata:\n  - {{type: jsonl, path: {src}}}\n")
    env = {**os.environ, "ZEBRA_CACHE": str(out / "cache")}
    # the cache holds the converted teacher too: point it at the user's so the tokenizer needs no conversion
    user_cache = Path(os.environ.get("ZEBRA_CACHE", "~/.cache/zebra")).expanduser()
    (out / "cache").mkdir(exist_ok=True)
    for name in os.listdir(user_cache):
        if name != "tokenized" and not (out / "cache" / name).exists():
            os.symlink(user_cache / name, out / "cache" / name)
    zebra = Path(sys.executable).parent / "zebra"
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(zebra), "prepare", str(cfg), "--loss-on", "all"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip())
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if rc != 0:
        print(f"zebra prepare failed with {rc}", file=sys.stderr)
        return rc
    shards = sorted((out / "cache" / "tokenized").glob("jsonl-*"))
    meta = json.loads((shards[-1] / "meta.json").read_text())
    disk = sum(f.stat().st_size for f in shards[-1].iterdir())

    # map it back and draw from it: what a run does (only touched pages are read)
    from zebra.data.corpus import ShardedCorpus

    t1 = time.perf_counter()
    c = ShardedCorpus(shards[-1])
    ids, mask = c.doc(len(c) - 1)
    map_s = time.perf_counter() - t1
    res = {
        "what": "zebra prepare of a plain-text JSONL source (tools/prepare_scale.py)",
        "machine": f"{platform.node()} {os.cpu_count()} CPUs", "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"), "corpus_bytes": corpus["bytes"], "docs": meta["docs"],
        "tokens": meta["tokens"], "shards": meta["shards"], "seconds": round(seconds, 1),
        "tokens_per_s": round(meta["tokens"] / seconds), "peak_rss_mib": round(peak_kib / 1024, 1),
        "shard_bytes_on_disk": disk, "map_and_read_last_doc_s": round(map_s, 3), "last_doc_tokens": len(ids),
        "progress_lines": [x for x in lines if "tokens/s" in x][:3] + [x for x in lines if "tokenised" in x],
    }
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if not args.keep:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
