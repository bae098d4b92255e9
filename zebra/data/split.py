"""The seeded ILD / end-to-end KD split of SPEC 4 (20 % / 80 %), by a stable hash of (seed, source key,
conversation index): deterministic, disjoint and covering, the same on every machine and process."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ..errors import ZebraError


def ild_kd_part(index: int, ild_fraction: float = 0.2, seed: int = 0, salt: str = "") -> str:
    """"ild" or "kd" for conversation `index`, from a stable hash (process- and platform-independent)."""
    h = hashlib.sha256(f"zebra-ild-kd:{seed}:{salt}:{index}".encode()).digest()
    return "ild" if int.from_bytes(h[:8], "big") / 2.0**64 < ild_fraction else "kd"


def split_ild_kd(conversations: Iterable, ild_fraction: float = 0.2, seed: int = 0,
                 salt: str = "") -> tuple[list, list]:
    """(ild, kd) lists: conversation i goes to ILD with probability `ild_fraction`, by `ild_kd_part(i, ...)`.
    The same (fraction, seed, salt) splits the same way everywhere, so the ILD and KD stages never share a
    conversation, whatever they each consume."""
    if not 0.0 <= ild_fraction <= 1.0:
        raise ZebraError(f"ild_fraction must be in [0, 1], got {ild_fraction}")
    ild, kd = [], []
    for i, conv in enumerate(conversations):
        (ild if ild_kd_part(i, ild_fraction, seed, salt) == "ild" else kd).append(conv)
    return ild, kd
