"""One training run of a tiny hybrid student (distillation from a tiny teacher) through zebra's Trainer, as the
pipeline runs it: StageLoss wrapped by FSDP2 / DDP when torchrun starts several ranks (gloo on CPU). Used by
tests/test_distributed.py:

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py OUT STRATEGY ROWS [STEPS [STAGE]]

STRATEGY: fsdp or ddp, "+teacher" (fsdp+teacher) also shards the frozen teacher's layers (shard_frozen). STAGE:
distill (default; one hybrid student) or ild (mixer-only ILD of an all-MLA and an all-Mamba2 student from one teacher
pass). Rank 0 writes OUT/final.pt (the full state of every student) when training ends. ZEBRA_STOP_AFTER_STEPS stops every
rank after that many steps (a kill); a second start with the same OUT resumes from OUT/run/checkpoint.
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))


def main(out: str, strategy: str, rows: int, steps: int = 6, stage: str = "distill") -> None:
    from test_model import tiny_model

    from zebra.data.packing import PackedStream, TokenizedCorpus
    from zebra.stages.distill import distill_parameters, make_distill_loss
    from zebra.stages.ild import ild_parameters, make_ild_loss
    from zebra.stages.parallel import StageLoss, full_state_dict, init_distributed, is_sharded, regroup, shard_frozen, wrap
    from zebra.stages.trainer import Trainer, TrainConfig, param_groups

    rank, world, device = init_distributed()
    strategy, _, shard = strategy.partition("+")
    teacher = tiny_model(["attention"] * 3, seed=0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if shard == "teacher":
        shard_frozen(teacher)
        assert is_sharded(teacher) == (world > 1)
    if stage == "ild":
        students = {"mla": tiny_model(["mla"] * 3, seed=1), "mamba2": tiny_model(["mamba2"] * 3, seed=2)}
        groups = param_groups(ild_parameters(students, "mixers"))
        fn = make_ild_loss(teacher, students, "mixers")
    else:
        students = {"student": tiny_model(["mla", "mamba2", "mamba2"], seed=1)}
        groups = param_groups(distill_parameters(students["student"], 3e-3, 1e-3))
        fn = make_distill_loss(teacher, students["student"], chunk_tokens=64)
    rng = np.random.default_rng(0)  # the same documents on every rank; the stream gives each rank its rows
    docs = [(rng.integers(1, 97, n).tolist(), [1] * n) for n in rng.integers(5, 40, 60)]
    corpus = TokenizedCorpus.from_examples(docs)
    seq = 32
    global_rows = rows * world
    stream = PackedStream(corpus, seq_len=seq, batch_size=rows, seed=0, max_tokens=steps * global_rows * seq)
    loss = StageLoss(students, fn)
    before = {id(p): n for n, p in loss.named_parameters()}
    wrapped = wrap(loss, strategy, mixed_precision=False, device=device)
    if wrapped is not loss:
        wrapped.count = loss.count
    cfg = TrainConfig(tokens=steps * global_rows * seq, lr=3e-3, batch_size=rows, ckpt_every=2, warmup_steps=1,
                      schedule="wsd")
    trainer = Trainer(wrapped, regroup(groups, before, wrapped), None, stream, cfg, Path(out) / "run", "t", device)
    summary = trainer.fit()
    if is_sharded(teacher):  # each rank holds 1/world of every teacher layer, and after the run only that
        from torch.distributed.tensor import DTensor

        for p in teacher.model.layers.parameters():
            assert isinstance(p, DTensor) and p.to_local().numel() <= -(-p.numel() // world), p.shape
        assert not isinstance(teacher.lm_head.weight, DTensor)  # the head stays whole (the fused KL reads it)
    state = {f"{k}.{n}": t for k, m in students.items() for n, t in full_state_dict(m).items()}
    if rank == 0:
        torch.save({"state": state, "summary": summary}, Path(out) / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *(int(a) for a in sys.argv[4:5]), *sys.argv[5:6])
