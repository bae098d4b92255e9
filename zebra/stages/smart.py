"""SMART layer selection: which N of the L layers become MLA (SPEC 6; paper §3.1.2, App. B, Algorithm 2).

    smart_select(scores, 4)                      -> [0, 5, 10, 14]   (Llama-3.2-1B scores of SPEC 6)
    plan = smart_plan(scores, 4); plan.to_dict() -> {"layers": [...], "p": 4, "l1": 0, "ln": 14, ...}
    scores = load_scores("sensitivity.json")     # a JSON list, or an object with a "scores" list
    kv_budget_num_mla(load_teacher_config("llama-3.2-1b"), 0.04, kv_rank=128, rope_dim=32)  -> 4

Layers are 0-based. With scores s_0..s_{L-1} (SPEC 5: s_i = KL_0 - KL_i, higher = layer i matters more):
  1. terminal preservation: p = floor(L/N), L1 = argmax s over [0, p-1], LN = argmax s over [L-p, L-1];
  2. near-uniform middle: T = LN - L1 - N + 1 free layers are split into the N-1 gaps between consecutive
     chosen layers (L1, N-2 middle layers, LN), each gap in [floor(T/(N-1)), ceil(T/(N-1))];
  3. maximal sensitivity: the middle set with the largest sum of scores wins.

Decisions where the paper is silent (also listed in `zebra smart --help`):
  * argmax ties inside a terminal window go to the lowest index; ties between middle sets (exactly equal
    sums as computed) go to the lexicographically smallest layer list.
  * N = 0 -> []; N = 1 -> [argmax of all scores] (p = L, both windows are the whole model);
    N = 2 -> terminal preservation only, [L1, LN] with p = floor(L/2), so the windows [0, p-1] and [L-p, L-1]
    are disjoint and L1 < LN; N = L -> every layer (p = 1, T = 0); N > L or N < 0 -> ZebraError.
  * An empty candidate set cannot happen, so there is no fallback: for 2 <= N <= L,
    T >= L - 2p - N + 2 >= L + 2 - N - 2L/N, which is concave in N and 0 at N = 2 and N = L, so T >= 0; and any
    T >= 0 splits into N-1 parts of floor/ceil(T/(N-1)) (r = T mod (N-1) ceil parts). `_best_middle` still
    raises a ZebraError if handed T < 0 directly, rather than return a wrong layout.

The number of candidates is C(N-1, r) (SPEC 6: 3, 5, 1 for N = 4, 6, 8), which can be ~1e11 for a 100-layer
model, so the winner is found by dynamic programming over gap sequences (state: gaps placed, ceil gaps used;
O(N * r)); `enumerate_middles` lists the candidates explicitly for small cases and tests.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import ZebraError


# ---- scores ----------------------------------------------------------------------------------------------
def validate_scores(scores, num_layers: int | None = None, source: str = "scores") -> list[float]:
    """A non-empty list of finite numbers (bools are not numbers here), as floats; ZebraError naming the problem."""
    if isinstance(scores, (str, bytes, dict)) or not isinstance(scores, Sequence):
        raise ZebraError(f"{source}: expected a list of numbers, got {type(scores).__name__}")
    if len(scores) == 0:
        raise ZebraError(f"{source}: the score list is empty")
    out = []
    for i, v in enumerate(scores):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ZebraError(f"{source}: score {i} is {v!r} ({type(v).__name__}), not a number")
        if not math.isfinite(float(v)):
            raise ZebraError(f"{source}: score {i} is {float(v)} (scores must be finite)")
        out.append(float(v))
    if num_layers is not None and len(out) != num_layers:
        raise ZebraError(f"{source}: {len(out)} scores for a {num_layers}-layer model (need one score per layer)")
    return out


def load_scores(path, num_layers: int | None = None) -> list[float]:
    """Scores from a JSON file: a list of numbers, or an object (e.g. sensitivity.json) with a "scores" list."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ZebraError(f"scores file {p} does not exist" if not p.exists() else f"scores path {p} is not a file")
    try:
        obj = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ZebraError(f"cannot read scores file {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise ZebraError(f"scores file {p} is not valid JSON ({e})") from None
    if isinstance(obj, dict):
        if "scores" not in obj:
            raise ZebraError(f"scores file {p}: the object has no \"scores\" key (keys: {sorted(obj)})")
        obj = obj["scores"]
    elif not isinstance(obj, list):
        raise ZebraError(f"scores file {p}: expected a JSON list of numbers or an object with a \"scores\" list, "
                         f"got a JSON {type(obj).__name__}")
    return validate_scores(obj, num_layers, source=f"scores file {p}")


# ---- the algorithm ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmartPlan:
    """The chosen layers and every intermediate quantity of Algorithm 2 (None where a step does not apply)."""

    layers: list[int]
    num_layers: int  # L
    num_mla: int  # N
    rule: str  # "none" (N=0) | "argmax" (N=1) | "terminal" (N=2) | "all" (N=L) | "smart"
    p: int | None = None
    l1: int | None = None
    ln: int | None = None
    total_gap: int | None = None  # T
    gap_min: int | None = None
    gap_max: int | None = None
    num_candidates: int = 1
    middle_score: float = 0.0  # sum of s over the N-2 middle layers of the winner

    def to_dict(self) -> dict:
        return asdict(self)


def _argmax(scores: list[float], lo: int, hi: int) -> int:
    """Index of the largest score in [lo, hi] (inclusive); ties go to the lowest index."""
    best = lo
    for i in range(lo + 1, hi + 1):
        if scores[i] > scores[best]:
            best = i
    return best


def gap_bounds(l1: int, ln: int, num_mla: int) -> tuple[int, int, int]:
    """(T, g_min, g_max) for N >= 2 chosen layers from l1 to ln (Algorithm 2 step 2)."""
    t = ln - l1 - num_mla + 1
    n_gaps = num_mla - 1
    return t, t // n_gaps, -(-t // n_gaps)


def count_candidates(l1: int, ln: int, num_mla: int) -> int:
    """Number of middle sets with all gaps in [g_min, g_max]: C(N-1, T mod (N-1)), or 0 when T < 0."""
    t, g_min, _ = gap_bounds(l1, ln, num_mla)
    if t < 0:
        return 0
    return math.comb(num_mla - 1, t - g_min * (num_mla - 1))


def enumerate_middles(l1: int, ln: int, num_mla: int) -> Iterator[tuple[int, ...]]:
    """Every candidate middle set, in lexicographic order, by recursing over the gap sequence (not over
    combinations of layers): each step picks the next gap from {g_min, g_max}, smaller gap first."""
    t, g_min, g_max = gap_bounds(l1, ln, num_mla)
    if t < 0:
        return
    gaps = sorted({g_min, g_max})

    def rec(pos: int, gaps_left: int, free_left: int, chosen: tuple[int, ...]):
        if gaps_left == 1:  # the last gap runs to LN and must take exactly what is left
            if free_left in gaps:
                yield chosen
            return
        for g in gaps:
            # the remaining gaps_left-1 gaps must be able to absorb the rest
            rest = free_left - g
            if g_min * (gaps_left - 1) <= rest <= g_max * (gaps_left - 1):
                yield from rec(pos + g + 1, gaps_left - 1, rest, chosen + (pos + g + 1,))

    yield from rec(l1, num_mla - 1, t, ())


def _best_middle(scores: list[float], l1: int, ln: int, num_mla: int) -> tuple[list[int], float]:
    """The max-score middle set (ties: lexicographically smallest) by DP over gap sequences.

    State (k, j): k gaps placed, j of them of size g_max, so the last chosen layer is l1 + k*(g_min+1) + j*dg.
    best[k][j] = the largest score the remaining gaps can add; exactly r = T - g_min*(N-1) gaps must be g_max."""
    t, g_min, g_max = gap_bounds(l1, ln, num_mla)
    if t < 0:
        raise ZebraError(f"no layer set fits between L1={l1} and LN={ln} for {num_mla} MLA layers (T={t} < 0)")
    n_gaps, n_mid = num_mla - 1, num_mla - 2
    dg = g_max - g_min
    r = t - g_min * n_gaps if dg else 0

    def pos(k: int, j: int) -> int:
        return l1 + k * (g_min + 1) + j * dg

    def gain(k: int, j: int) -> float:
        # the layer reached after k gaps counts only if it is a middle layer (k = n_gaps is LN itself)
        return scores[pos(k, j)] if k <= n_mid else 0.0

    neg = -math.inf
    best = [[neg] * (r + 1) for _ in range(n_gaps + 1)]
    best[n_gaps][r] = 0.0
    for k in range(n_gaps - 1, -1, -1):
        for j in range(min(k, r) + 1):
            small = gain(k + 1, j) + best[k + 1][j] if best[k + 1][j] > neg else neg
            big = gain(k + 1, j + 1) + best[k + 1][j + 1] if dg and j < r and best[k + 1][j + 1] > neg else neg
            best[k][j] = max(small, big)

    # Walk forward; on a tie take the smaller gap: it makes the next layer smaller, so the list lex-smaller.
    chosen, j = [], 0
    for k in range(n_mid):
        small = gain(k + 1, j) + best[k + 1][j] if best[k + 1][j] > neg else neg
        big = gain(k + 1, j + 1) + best[k + 1][j + 1] if dg and j < r and best[k + 1][j + 1] > neg else neg
        if big > small:
            j += 1
        chosen.append(pos(k + 1, j))
    return chosen, math.fsum(scores[i] for i in chosen)


def _check_num_mla(num_mla, num_layers: int) -> int:
    try:
        n = operator.index(num_mla)
    except TypeError:
        raise ZebraError(f"the number of MLA layers must be an integer, got {num_mla!r}") from None
    if isinstance(num_mla, bool):
        raise ZebraError(f"the number of MLA layers must be an integer, got {num_mla!r}")
    if n < 0:
        raise ZebraError(f"the number of MLA layers must be >= 0, got {n}")
    if n > num_layers:
        raise ZebraError(f"cannot choose {n} MLA layers from a {num_layers}-layer model (at most {num_layers})")
    return n


def smart_plan(scores, num_mla: int, num_layers: int | None = None) -> SmartPlan:
    """Algorithm 2 with all intermediate values; `num_layers`, when given, must equal len(scores)."""
    s = validate_scores(scores, num_layers)
    L = len(s)
    n = _check_num_mla(num_mla, L)
    if n == 0:
        return SmartPlan(layers=[], num_layers=L, num_mla=0, rule="none", num_candidates=1)
    if n == 1:
        best = _argmax(s, 0, L - 1)
        return SmartPlan(layers=[best], num_layers=L, num_mla=1, rule="argmax", p=L, l1=best, ln=best)

    p = L // n
    l1 = _argmax(s, 0, p - 1)
    ln = _argmax(s, L - p, L - 1)
    # 2p <= L for n >= 2, so the two windows are disjoint and l1 < ln
    t, g_min, g_max = gap_bounds(l1, ln, n)
    middle, middle_score = _best_middle(s, l1, ln, n)
    layers = [l1, *middle, ln]
    rule = "all" if n == L else "terminal" if n == 2 else "smart"
    return SmartPlan(layers=layers, num_layers=L, num_mla=n, rule=rule, p=p, l1=l1, ln=ln, total_gap=t,
                     gap_min=g_min, gap_max=g_max, num_candidates=count_candidates(l1, ln, n),
                     middle_score=middle_score)


def smart_select(scores: list[float], num_mla: int, num_layers: int | None = None) -> list[int]:
    """The sorted 0-based MLA layers SMART picks (SPEC 6)."""
    return smart_plan(scores, num_mla, num_layers).layers


def top_select(scores: list[float], num_mla: int) -> list[int]:
    """The num_mla highest-scoring layers (the paper's "top-N" baseline in Table 3), sorted; ties to the lower index."""
    if not 0 <= num_mla <= len(scores):
        raise ZebraError(f"cannot pick {num_mla} of {len(scores)} layers")
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:num_mla])


def uniform_select(num_layers: int, num_mla: int) -> list[int]:
    """num_mla layers evenly spaced from the first to the last (Table 3's uniform baseline; includes both ends)."""
    if not 0 <= num_mla <= num_layers:
        raise ZebraError(f"cannot pick {num_mla} of {num_layers} layers")
    if num_mla == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (num_mla - 1)) for i in range(num_mla)})


# ---- KV budget (SPEC 9) ----------------------------------------------------------------------------------
def kv_geometry(cfg, kv_rank: int | None, rope_dim: int | None) -> tuple[int, int, int]:
    """(L, teacher KV values per token over all layers, values per token of one MLA layer) from an HF teacher
    config dict or a ZebraConfig. Unset ranks default as in `zebra convert` (or to the ZebraConfig's own)."""
    if isinstance(cfg, dict):
        try:
            L = int(cfg["num_hidden_layers"])
            n_h = int(cfg["num_attention_heads"])
            d_h = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // n_h)
        except KeyError as e:
            raise ZebraError(f"teacher config has no '{e.args[0]}'") from None
        n_kv = int(cfg.get("num_key_value_heads") or n_h)
        if kv_rank is None or rope_dim is None:
            from ..convert.layout import DEFAULT_KV_RANK, DEFAULT_ROPE_DIM

            kv_rank = DEFAULT_KV_RANK if kv_rank is None else kv_rank
            rope_dim = min(DEFAULT_ROPE_DIM, d_h // 2) if rope_dim is None else rope_dim
    else:  # a ZebraConfig (or anything with its field names)
        L, n_kv, d_h = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        kv_rank = cfg.kv_lora_rank if kv_rank is None else kv_rank
        rope_dim = cfg.qk_rope_head_dim if rope_dim is None else rope_dim
    if kv_rank <= 0 or rope_dim < 0:
        raise ZebraError(f"MLA KV rank must be > 0 and rope dim >= 0, got r_kv={kv_rank}, d_r={rope_dim}")
    return L, L * 2 * n_kv * d_h, kv_rank + rope_dim


def kv_fraction(cfg, num_mla: int, kv_rank: int | None = None, rope_dim: int | None = None) -> float:
    """Student KV cache / teacher KV cache with `num_mla` MLA layers and the rest Mamba2: N(r_kv+d_r)/(L*2*n_kv*d_h)."""
    _, teacher, per_mla = kv_geometry(cfg, kv_rank, rope_dim)
    return num_mla * per_mla / teacher


def kv_budget_num_mla(cfg, kv_budget_fraction: float, kv_rank: int | None = None,
                      rope_dim: int | None = None) -> int:
    """The largest N <= L with N*(r_kv + d_r) / (L*2*n_kv*d_h) <= kv_budget_fraction (in (0, 1]; 0.04 = 4%).
    May be 0 when one MLA layer alone is over budget."""
    f = kv_budget_fraction
    if isinstance(f, bool) or not isinstance(f, numbers.Real) or not math.isfinite(float(f)) or not 0 < f <= 1:
        raise ZebraError(f"KV budget must be a fraction in (0, 1] of the teacher's KV cache, e.g. 0.04 for 4%; "
                         f"got {f!r}")
    L, teacher, per_mla = kv_geometry(cfg, kv_rank, rope_dim)
    # Exact decimal arithmetic: 0.0390625 * 16384 * 16 / 160 must give 4, not 3.9999999.
    n = math.floor(Fraction(str(float(f))) * teacher / per_mla)
    return min(n, L)
