"""Several ranks on the CPU (torchrun, gloo): 2 ranks with FSDP2 or DDP update the student exactly as 1 rank with
the same global batch; a run killed under 2 ranks and restarted ends where an uninterrupted one does; a
checkpoint written at 2 ranks resumes at 1; and `torchrun -m zebra.cli run` of a tiny pipeline gives one set of
stage folders and the KL of a 1-process run. (Per-token weighting of unequal micro-batches is in test_trainer.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "distributed_worker.py"


def launch(out: Path, strategy: str, world: int, rows: int, steps: int = 6, stop_after: int = 0, stage: str = "distill"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZEBRA_DEVICE": "cpu"}
    env.pop("ZEBRA_STOP_AFTER_STEPS", None)
    if stop_after:
        env["ZEBRA_STOP_AFTER_STEPS"] = str(stop_after)
    # --standalone: torchrun binds a free port itself (a port picked here could be taken before torchrun binds it)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           str(WORKER), str(out), strategy, str(rows), str(steps), stage] if world > 1 else \
          [sys.executable, str(WORKER), str(out), strategy, str(rows), str(steps), stage]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def final(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=False)["state"]


def assert_same(a: dict, b: dict, tol=2e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=tol, rtol=tol, msg=k)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    r = launch(out, "fsdp", 1, rows=4)
    assert r.returncode == 0, r.stderr[-3000:]
    return final(out)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_ranks_update_like_one_rank_with_the_same_global_batch(one_rank, tmp_path, strategy):
    r = launch(tmp_path, strategy, 2, rows=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(one_rank, final(tmp_path))


def test_a_sharded_teacher_gives_the_updates_of_a_replicated_one(one_rank, tmp_path):
    """teacher_sharding: each teacher layer sharded over 2 ranks (gathered for its forward only; the worker checks
    each rank holds half of it after the run) trains the student exactly as one rank with the whole teacher."""
    r = launch(tmp_path, "fsdp+teacher", 2, rows=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(one_rank, final(tmp_path))


def test_ild_with_a_sharded_teacher_equals_one_rank(tmp_path):
    """Mixer-only ILD of both pools (the teacher run layer by layer for its targets) under 2 ranks with the teacher's
    layers sharded == 1 rank with the same global batch."""
    r = launch(tmp_path / "one", "fsdp", 1, rows=4, steps=4, stage="ild")
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(tmp_path / "two", "fsdp+teacher", 2, rows=2, steps=4, stage="ild")
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = final(tmp_path / "one"), final(tmp_path / "two")
    assert any(k.startswith("mla.") for k in one) and any(k.startswith("mamba2.") for k in one)
    assert_same(one, two)


def test_the_teacher_sharding_rule():
    """shard_teacher, which the pipeline and `zebra plan` both ask: never with one rank or DDP; auto shards above an
    eighth of a GPU and never on a CPU rank."""
    from zebra.stages.parallel import shard_teacher

    G = 80 * 2**30
    assert not shard_teacher("shard", "fsdp", 1, 16e9, G)
    assert not shard_teacher("shard", "ddp", 8, 16e9, G)
    assert shard_teacher("shard", "fsdp", 2, 1.0, None)
    assert not shard_teacher("replicate", "fsdp", 8, 16e9, G)
    assert shard_teacher("auto", "fsdp", 8, 16e9, G)  # 8B in bf16 on an 80 GB GPU
    assert not shard_teacher("auto", "fsdp", 8, 2.5e9, G)  # 1B
    assert not shard_teacher("auto", "fsdp", 8, 16e9, None)
    with pytest.raises(ValueError, match="teacher_sharding"):
        shard_teacher("half", "fsdp", 2, 1.0, G)


def test_kill_and_resume_under_two_ranks_equals_uninterrupted(one_rank, tmp_path):
    r = launch(tmp_path, "fsdp", 2, rows=2, stop_after=3)  # killed after step 3; checkpoint at step 2
    assert r.returncode != 0 and (tmp_path / "run" / "checkpoint" / "meta.pt").exists()
    assert not (tmp_path / "final.pt").exists()
    r = launch(tmp_path, "fsdp", 2, rows=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(one_rank, final(tmp_path))
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"resumed"' in x]
    assert events and events[0]["step"] == 2 and events[0]["world"] == 2


def test_checkpoint_saved_at_two_ranks_resumes_at_one(one_rank, tmp_path):
    r = launch(tmp_path, "fsdp", 2, rows=2, stop_after=3)
    assert r.returncode != 0
    r = launch(tmp_path, "fsdp", 1, rows=4)  # the same global batch on one rank
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(one_rank, final(tmp_path), tol=1e-4)
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"resumed"' in x]
    assert events[0]["world"] == 1 and events[0]["saved_world"] == 2


from test_pipeline import tiny_setup, write_config  # noqa: E402,F401  (the tiny teacher + chat data fixture)


def test_torchrun_pipeline_matches_one_process(tiny_setup, tmp_path):
    """`torchrun --nproc-per-node 2 -m zebra.cli run` of a tiny config (FSDP2 on gloo, the teacher's layers and DPO's
    reference sharded too) completes with one set of stage folders written by rank 0, and the held-out KL of a
    1-process run with the same global batch."""
    # the same preference pairs for both runs (pairs sampled from each run's own student could differ: sampling
    # turns the runs' last-bit differences into different tokens)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say something about {w}.", "chosen": f"{w} is fine and good.",
                                         "rejected": f"no {w}"}) + "\n" for w in ("cats", "rain", "tea", "maps")))
    base = dict(dpo={"lr": 1e-4, "batch_size": 2, "max_len": 64, "ckpt_every": 1, "pairs_file": str(pairs)},
                distill={"tokens": 64 * 2 * 4, "lr": 1e-3, "batch_size": 2, "ckpt_every": 2},
                ild={"tokens": 64 * 2 * 4, "lr": 1e-3, "batch_size": 2, "ckpt_every": 2})
    one = write_config(tiny_setup, "one-rank", **base)
    half = {k: {**v, "batch_size": 1} if k in ("ild", "distill") else v for k, v in base.items()}
    half["dpo"] = {**half["dpo"], "batch_size": 1}
    two = write_config(tiny_setup, "two-ranks", teacher_sharding="shard", **half)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZEBRA_DEVICE": "cpu"}
    r1 = subprocess.run([sys.executable, "-m", "zebra.cli", "run", str(one), "--out", str(tmp_path / "a")],
                        capture_output=True, text=True, timeout=900, env=env)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "zebra.cli", "run", str(two), "--out", str(tmp_path / "b")],
                        capture_output=True, text=True, timeout=900, env=env)
    (tmp_path / "r2.log").write_text(r2.stdout + r2.stderr)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = (json.loads((tmp_path / x / "summary.json").read_text()) for x in "ab")
    # equal up to the order of floating-point reductions (FSDP2's reduce-scatter vs one process' sums), which a few
    # training steps amplify to ~0.3% of this tiny KL
    assert b["student"]["heldout_kl"] == pytest.approx(a["student"]["heldout_kl"], rel=1e-2)
    d = json.loads((tmp_path / "b" / "distill" / "summary.json").read_text())
    assert d["world_size"] == 2 and d["tokens_per_step"] == 64 * 2 and d["teacher_sharded"] is True
    assert json.loads((tmp_path / "b" / "ild" / "summary.json").read_text())["teacher_sharded"] is True
    assert json.loads((tmp_path / "a" / "distill" / "summary.json").read_text())["teacher_sharded"] is False
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.is_dir()) == sorted(
        p.name for p in (tmp_path / "a").iterdir() if p.is_dir())
    assert r2.stdout.count("[zebra run] distill: done") == 1  # rank 0 alone reports
    p = json.loads((tmp_path / "b" / "dpo" / "summary.json").read_text())
    assert p["world_size"] == 2 and p["steps"] == 2 and p["teacher_sharded"] is True  # pairs split, reference sharded


def test_nvlink_multicast_stays_off_unless_the_user_sets_it():
    """init_distributed / zebra run --nproc set NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
    NVSHMEM_DISABLE_NVLS=1 where the environment has no value; a user's own value wins."""
    from zebra.stages.parallel import multicast_off

    env = {"NCCL_NVLS_ENABLE": "1", "PATH": "/bin"}
    added = multicast_off(env)
    assert added == {"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    assert env["NCCL_NVLS_ENABLE"] == "1" and env["PATH"] == "/bin"
    assert multicast_off(env) == {}
    fresh = {}
    multicast_off(fresh)
    assert fresh == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
