"""SMART layer selection (SPEC 6, Algorithm 2), its edge cases, score loading, the KV budget and `zebra smart`."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from zebra import cli
from zebra.convert.teacher import load_teacher_config
from zebra.errors import ZebraError
from zebra.stages.smart import (
    _best_middle,
    count_candidates,
    enumerate_middles,
    kv_budget_num_mla,
    kv_fraction,
    load_scores,
    smart_plan,
    smart_select,
)

# Paper Table 7: Llama-3.2-1B sensitivity scores, 16 layers (SPEC 6).
S1B = [1185.06, 382.73, 480.68, 350.95, 196.03, 367.82, 250.45, 114.44,
       238.10, 120.56, 323.23, 228.90, 168.69, 233.87, 624.03, 361.47]


def run_cli(argv, capsys):
    """Run `zebra ARGV` in-process; returns (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def brute_force(scores, num_mla):
    """Algorithm 2 read literally: every (N-2)-subset of the layers between L1 and LN, gaps checked, max sum,
    ties to the lexicographically smallest. Exponential; for small L only."""
    L = len(scores)
    p = L // num_mla
    l1 = max(range(p), key=lambda i: (scores[i], -i))
    ln = max(range(L - p, L), key=lambda i: (scores[i], -i))
    t = ln - l1 - num_mla + 1
    g_min, g_max = math.floor(t / (num_mla - 1)), math.ceil(t / (num_mla - 1))
    cands = []
    for mid in itertools.combinations(range(l1 + 1, ln), num_mla - 2):
        seq = [l1, *mid, ln]
        if all(g_min <= b - a - 1 <= g_max for a, b in zip(seq, seq[1:])):
            cands.append(mid)
    best = max(cands, key=lambda c: (sum(scores[i] for i in c), [-i for i in c]))
    return [l1, *best, ln], cands


# ---- the worked examples ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n,expected,t,gaps,count", [
    (4, [0, 5, 10, 14], 11, (3, 4), 3),
    (6, [0, 2, 5, 8, 11, 14], 9, (1, 2), 5),
    (8, [0, 2, 4, 6, 8, 10, 12, 14], 7, (1, 1), 1),
])
def test_worked_examples(n, expected, t, gaps, count):
    """SPEC 6 examples 1-3: chosen layers, T, gap range and number of candidates exactly as in the paper."""
    plan = smart_plan(S1B, n)
    assert plan.layers == expected
    assert (plan.l1, plan.ln) == (0, 14)
    assert plan.total_gap == t
    assert (plan.gap_min, plan.gap_max) == gaps
    assert plan.num_candidates == count
    assert len(list(enumerate_middles(0, 14, n))) == count


def test_example1_candidate_sets():
    """SPEC 6 example 1 lists the candidates {4,9}, {5,9}, {5,10}; {5,10} has the largest score sum."""
    assert list(enumerate_middles(0, 14, 4)) == [(4, 9), (5, 9), (5, 10)]
    assert smart_plan(S1B, 4).middle_score == pytest.approx(367.82 + 323.23)


@pytest.mark.parametrize("other", [[0, 4, 8, 12], [3, 7, 11, 15], [0, 1, 2, 14]])
def test_table3_baselines_are_not_smart(other):
    """The uniform and top-4 layouts SPEC 6 compares against are not what SMART returns for N = 4."""
    assert smart_select(S1B, 4) != other


def test_dp_matches_brute_force():
    """The gap DP equals the literal enumeration of Algorithm 2 (incl. ties) on random and tied scores."""
    rng = random.Random(0)
    for L in range(3, 13):
        for n in range(2, L + 1):
            for tied in (False, True):
                scores = [float(rng.randint(0, 3)) if tied else rng.uniform(-5, 5) for _ in range(L)]
                expected, cands = brute_force(scores, n)
                plan = smart_plan(scores, n)
                assert plan.layers == expected, (scores, n)
                assert plan.num_candidates == len(cands) >= 1
                assert list(enumerate_middles(plan.l1, plan.ln, n)) == cands


def test_ties_go_to_lexicographically_smallest():
    """All-equal scores: L1 and LN are the lowest index of their windows, the middle set is lex-smallest."""
    # L = 10, N = 4: p = 2, L1 = 0 (not 1), LN = 8 (not 9), T = 5, gaps in [1, 2]: (2,5), (3,5), (3,6)
    assert smart_select([1.0] * 10, 4) == [0, 2, 5, 8]


def test_never_infeasible_for_any_layer_count():
    """For 1 <= N <= L <= 40 SMART returns N distinct sorted layers with at least one candidate (no fallback)."""
    rng = random.Random(1)
    for L in range(1, 41):
        scores = [rng.random() for _ in range(L)]
        for n in range(0, L + 1):
            plan = smart_plan(scores, n)
            assert plan.layers == sorted(set(plan.layers)) and len(plan.layers) == n
            assert plan.total_gap is None or plan.total_gap >= 0
            assert plan.num_candidates >= 1


def test_infeasible_gap_is_refused():
    """Handed L1/LN too close for N layers (T < 0), the helpers report no candidate and refuse to pick."""
    assert list(enumerate_middles(5, 7, 5)) == []
    assert count_candidates(5, 7, 5) == 0
    with pytest.raises(ZebraError, match="T=-2"):
        _best_middle([0.0] * 10, 5, 7, 5)


def test_large_model_is_fast():
    """A 100-layer model with ~1e11 candidates (N = 41) is solved by the DP, not enumeration."""
    rng = random.Random(2)
    plan = smart_plan([rng.random() for _ in range(100)], 41)
    assert plan.num_candidates > 10**10
    assert len(plan.layers) == 41


# ---- edge cases --------------------------------------------------------------------------------------------
def test_edge_cases_n0_n1_n2_nL():
    """N = 0 -> [], N = 1 -> global argmax, N = 2 -> [L1, LN] over half windows, N = L -> all layers."""
    assert smart_select(S1B, 0) == []
    assert smart_select(S1B, 1) == [0]
    assert smart_select([1, 5, 2, 9, 3], 1) == [3]
    # N = 2, L = 16: p = 8; best of 0..7 is 0, best of 8..15 is 14
    assert smart_select(S1B, 2) == [0, 14]
    # L = 5: p = 2, windows 0..1 and 3..4; the global max (index 2) is in neither
    assert smart_select([1, 0, 9, 0, 2], 2) == [0, 4]
    assert smart_select([1, 9, 0, 0, 2], 2) == [1, 4]
    assert smart_select(S1B, 16) == list(range(16))
    assert smart_select([3.0], 1) == [0]
    assert smart_select([3.0, 1.0], 2) == [0, 1]


@pytest.mark.parametrize("n,match", [(17, "cannot choose 17"), (-1, ">= 0"), (2.5, "integer"), (True, "integer")])
def test_bad_num_mla(n, match):
    """N > L, N < 0 and non-integer N are refused with a message."""
    with pytest.raises(ZebraError, match=match):
        smart_select(S1B, n)


@pytest.mark.parametrize("scores,match", [
    ([], "empty"),
    ([1.0, float("nan"), 2.0], "score 1 is nan"),
    ([1.0, 2.0, float("inf")], "score 2 is inf"),
    ([1.0, "2", 3.0], "score 1 is '2'"),
    ([1.0, True], "score 1 is True"),
    ({"scores": [1.0]}, "expected a list"),
    ("1,2,3", "expected a list"),
])
def test_bad_scores(scores, match):
    """Empty, non-finite, non-numeric and non-list scores are refused, naming the problem."""
    with pytest.raises(ZebraError, match=match):
        smart_select(scores, 1)


def test_wrong_length():
    """A score list whose length differs from the model's layer count is refused."""
    with pytest.raises(ZebraError, match="15 scores for a 16-layer model"):
        smart_select(S1B[:15], 4, num_layers=16)


# ---- load_scores -------------------------------------------------------------------------------------------
def test_load_scores_list_and_sensitivity_object(tmp_path):
    """Both file forms load to the same floats; the object form reads its "scores" key."""
    a, b = tmp_path / "a.json", tmp_path / "sensitivity.json"
    a.write_text(json.dumps(S1B))
    b.write_text(json.dumps({"kl0": 1.0, "scores": S1B}))
    assert load_scores(a) == S1B == load_scores(b, num_layers=16)


@pytest.mark.parametrize("text,match", [
    ("[1, 2,", "not valid JSON"),
    ("3.5", "got a JSON float"),
    ('{"kl": [1, 2]}', "no \"scores\" key"),
    ('{"scores": 5}', "expected a list"),
    ("[1, NaN]", "score 1 is nan"),
    ("[[1], [2]]", "not a number"),
])
def test_load_scores_errors(tmp_path, text, match):
    """Bad JSON, wrong top-level shape and bad entries are ZebraErrors naming the file's problem."""
    f = tmp_path / "s.json"
    f.write_text(text)
    with pytest.raises(ZebraError, match=match):
        load_scores(f)


def test_load_scores_missing_file(tmp_path):
    """A missing scores file is a ZebraError that names it."""
    with pytest.raises(ZebraError, match="does not exist"):
        load_scores(tmp_path / "nope.json")


# ---- KV budget ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction,n", [(0.04, 4), (0.039, 3), (0.0390625, 4), (0.005, 0), (1.0, 16)])
def test_kv_budget_llama_1b(fraction, n):
    """Llama-3.2-1B, r_kv 128, d_r 32: one MLA layer is 160/16384 = 0.977%, so 4% fits 4 and 3.9% fits 3
    (exactly 4 layers' worth, 3.90625%, still fits 4; 100% is capped at L)."""
    cfg = load_teacher_config("llama-3.2-1b")
    assert kv_budget_num_mla(cfg, fraction, kv_rank=128, rope_dim=32) == n
    assert kv_fraction(cfg, 4, 128, 32) == pytest.approx(640 / 16384)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), 4])
def test_kv_budget_out_of_range(fraction):
    """A budget outside (0, 1] (e.g. 4 meaning 4%) is refused with a hint."""
    with pytest.raises(ZebraError, match="0.04 for 4%"):
        kv_budget_num_mla(load_teacher_config("llama-3.2-1b"), fraction, 128, 32)


# ---- CLI ---------------------------------------------------------------------------------------------------
@pytest.fixture
def scores_file(tmp_path):
    f = tmp_path / "sensitivity.json"
    f.write_text(json.dumps({"scores": S1B}))
    return f


def test_cli_json(scores_file, capsys):
    """`zebra smart --num-mla 6 --json` prints the example-2 layers and the plan."""
    rc, out, _ = run_cli(["smart", "--scores", scores_file, "--num-mla", 6, "--json"], capsys)
    assert rc == 0
    obj = json.loads(out)
    assert obj["layers"] == [0, 2, 5, 8, 11, 14]
    assert obj["num_candidates"] == 5 and obj["mla_layers"] == "0,2,5,8,11,14"


def test_cli_kv_budget(scores_file, capsys):
    """--kv-budget 0.04 on llama-3.2-1b picks N = 4 and the example-1 layers at 3.91% KV."""
    rc, out, _ = run_cli(["smart", "--scores", scores_file, "--kv-budget", 0.04, "--teacher", "llama-3.2-1b",
                          "--kv-rank", 128, "--rope-dim", 32, "--json"], capsys)
    assert rc == 0
    obj = json.loads(out)
    assert obj["num_mla"] == 4 and obj["layers"] == [0, 5, 10, 14]
    assert round(obj["kv_percent"], 2) == 3.91


def test_cli_human_output(scores_file, capsys):
    """The text output shows p, L1, LN, the gap range, the candidate count and the KV %."""
    rc, out, _ = run_cli(["smart", "--scores", scores_file, "--num-mla", 4, "--teacher", "llama-3.2-1b",
                          "--kv-rank", 128, "--rope-dim", 32], capsys)
    assert rc == 0
    for piece in ["p = 4", "L1 = 0", "LN = 14", "gaps in [3, 4]", "3 candidate", "(3.91%)",
                  "--mla-layers 0,5,10,14"]:
        assert piece in out


@pytest.mark.parametrize("argv,match", [
    (["--num-mla", 17], "cannot choose 17"),
    (["--num-mla", 4, "--num-layers", 15], "16 scores for a 15-layer model"),
    (["--kv-budget", 0.04], "needs --teacher"),
    (["--kv-budget", 0.005, "--teacher", "llama-3.2-1b"], "allows no MLA layer"),
    (["--num-mla", 4, "--teacher", "llama-3.2-3b"], "16 scores for a 28-layer model"),
])
def test_cli_errors(scores_file, capsys, argv, match):
    """User errors exit 2 with a one-line message, no traceback."""
    rc, _, err = run_cli(["smart", "--scores", scores_file, *argv], capsys)
    assert rc == 2
    assert match in err


def test_top_and_uniform_placements_hand_checked():
    """Table 3's baselines: the N highest scores, and N layers evenly spaced from the first to the last."""
    from zebra.stages.smart import top_select, uniform_select

    s = [1185.06, 382.73, 480.68, 350.95, 196.03, 367.82, 250.45, 114.44,
         238.10, 120.56, 323.23, 228.90, 168.69, 233.87, 624.03, 361.47]
    assert top_select(s, 4) == [0, 1, 2, 14]  # the paper's top-4 row
    assert uniform_select(16, 4) == [0, 5, 10, 15]
    assert uniform_select(30, 6) == [0, 6, 12, 17, 23, 29]
    assert uniform_select(30, 1) == [0]
    with pytest.raises(ZebraError):
        top_select(s, 17)
