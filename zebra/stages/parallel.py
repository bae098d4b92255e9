"""Several processes, one run: process group set-up, the data-parallel wrappers (FSDP2 or DDP) around a stage's
loss module, rank guards, and full state dicts for saving. Started the standard way:

    torchrun --nproc-per-node N -m zebra.cli run CONFIG        (or `zebra run CONFIG --nproc N`)

    rank, world, device = init_distributed()                  # from torchrun's environment; NCCL on GPUs, gloo on CPU
    loss = StageLoss({"student": student}, loss_fn)            # the loss runs inside a module forward ...
    wrapped = wrap(loss, "fsdp", mixed_precision=True)         # ... so FSDP2 / DDP see every parameter use
    groups = regroup(groups, loss)                             # parameter groups re-pointed at the sharded params
    state = full_state_dict(student)                           # rank 0: full tensors (for save_pretrained)

FSDP2 (torch.distributed.fsdp.fully_shard): every decoder layer is its own unit (its mixer, when only the mixer
trains: mixer-only ILD runs the mixers alone), the student's other parameters (embeddings, final norm, head) the
root unit; bf16 compute with fp32 master weights and fp32 gradient reduction
when mixed_precision. The frozen teacher (and DPO's reference) stays outside the wrapped module, run under no_grad:
replicated on every rank, or with `teacher_sharding: shard` (auto: when it would take more than an eighth of a GPU)
each of its decoder layers sharded by FSDP2 and gathered for its own forward only (shard_frozen): its memory per
rank is then the embeddings, head and final norm plus 1/N of the layers and the one or two layers being gathered.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


# NVLink multicast (NVLS) off unless the user says otherwise: NCCL's NVLS algorithms, torch's symmetric memory and
# NVSHMEM use it on NVSwitch hosts, and on shared hosts it can hang or fault the fabric for other tenants.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def multicast_off(env=None) -> dict:
    """Set MULTICAST_OFF's variables in `env` (default os.environ) where they are not set yet; returns what was
    set. Called before the process group exists (NCCL reads them when it builds a communicator)."""
    env = os.environ if env is None else env
    added = {k: v for k, v in MULTICAST_OFF.items() if k not in env}
    env.update(added)
    return added


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Initialises the default process group when torchrun started us (WORLD_SIZE in the
    environment); NCCL when a GPU is there, else gloo. One process without torchrun: (0, 1, cuda or cpu).
    NVLink multicast stays off unless the environment sets its variables (multicast_off)."""
    multicast_off()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("ZEBRA_DEVICE", "") != "cpu"
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # long stages run on rank 0 alone (sensitivity, evaluation) while the others wait in a barrier
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=4))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. tokenising into the shared cache), the others after it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def broadcast_object(obj, src: int = 0):
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class StageLoss(nn.Module):
    """A stage's loss as a module: forward(batch) -> (loss, n_tokens, metrics). The trained models are its
    submodules (what FSDP2 shards and DDP synchronises); `fn` reads them inside this forward, so every parameter
    use happens between the wrappers' hooks. The frozen teacher is captured by `fn`, not registered."""

    def __init__(self, models: dict[str, nn.Module], fn):
        super().__init__()
        self.models = nn.ModuleDict(models)
        self.fn = fn
        self.count = getattr(fn, "count", None)

    def forward(self, batch, call=None):
        """The loss of `batch`; or, with call=fn, fn() (held-out evaluation during training: the models run inside
        this forward, where FSDP2 has gathered the root parameters)."""
        return call() if call is not None else self.fn(batch)


def ensure_process_group(device: torch.device) -> None:
    """A process group for FSDP2 with one process: torchrun's (env://) when it started us, else a private one-rank
    group (benchmarks of the FSDP2 path on one GPU, tests)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        multicast_off()
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def wrap(loss: StageLoss, strategy: str = "fsdp", mixed_precision: bool = True,
         device: torch.device | None = None, force: bool = False) -> nn.Module:
    """The data-parallel module for a StageLoss when world > 1 (the StageLoss itself otherwise): FSDP2 (decoder layers
    as units, the rest the root unit) or DDP. force: wrap with one rank too (needs a process group: the FSDP2 path
    measured on one GPU, `zebra bench --train-variants fsdp`)."""
    if rank_world()[1] == 1 and not force:
        return loss
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device is not None and device.type == "cuda" else None
        return DistributedDataParallel(loss, device_ids=ids)
    if strategy != "fsdp":
        raise ValueError(f"strategy must be 'fsdp' or 'ddp', got {strategy!r}")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
          else MixedPrecisionPolicy())
    for model in loss.models.values():
        for layer in model.model.layers:
            trained = {id(p) for p in layer.parameters() if p.requires_grad}
            if not trained:
                continue
            # mixer-only ILD calls the mixers alone: then the mixer is the unit (its forward gathers it)
            in_mixer = trained <= {id(p) for p in layer.mixer.parameters()}
            fully_shard(layer.mixer if in_mixer and trained != {id(p) for p in layer.parameters()} else layer,
                        mp_policy=mp)
    fully_shard(loss, mp_policy=mp)
    return loss


TEACHER_SHARDING = ("auto", "shard", "replicate")


def shard_teacher(setting: str, strategy: str, world: int, teacher_bytes: float, gpu_bytes: float | None) -> bool:
    """The one rule for whether the frozen teacher is sharded (the pipeline and `zebra plan` both ask it): never with
    one rank or DDP; "shard" / "replicate" as said; "auto" shards when the replicated teacher would take more than an
    eighth of a GPU's memory (an 8B teacher in bf16, 16 GB, on an 80 GB GPU: yes; 1B-3B on 80-141 GB: no, the gathers
    would cost time for little memory). gpu_bytes None (a CPU rank): auto replicates."""
    if setting not in TEACHER_SHARDING:
        raise ValueError(f"teacher_sharding must be one of {TEACHER_SHARDING}, got {setting!r}")
    if world == 1 or strategy != "fsdp" or setting == "replicate":
        return False
    if setting == "shard":
        return True
    return gpu_bytes is not None and teacher_bytes > gpu_bytes / 8


def teacher_sharded(setting: str, strategy: str, teacher_bytes: float, device: torch.device) -> bool:
    """shard_teacher for this process group and this rank's device."""
    gpu = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return shard_teacher(setting, strategy, rank_world()[1], teacher_bytes, gpu)


def shard_frozen(model: nn.Module) -> nn.Module:
    """Shard a frozen ZebraForCausalLM's decoder layers across the ranks (FSDP2, in place; embeddings, final norm
    and head stay replicated: the fused KL reads the head's weight outside any forward). Each layer is its own unit
    that gathers its weights for its forward and frees them after it (reshard_after_forward=True also for a unit
    that runs as its own root, which is what every layer of a teacher called layer by layer is). Every rank must
    then run the teacher on the same number of batches (the trainer's equal steps per rank guarantee it). The
    layers' parameters keep their dtype (the teacher is already bf16 on GPUs)."""
    from torch.distributed.fsdp import fully_shard

    if rank_world()[1] == 1:
        return model
    for p in model.parameters():
        if p.requires_grad:
            raise ValueError("shard_frozen: the model has trainable parameters (freeze it first)")
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=True)
    model.zebra_sharded = True
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for a model that shard_frozen sharded (its forward is a collective: every rank must call it)."""
    return bool(getattr(model, "zebra_sharded", False))


def regroup(groups: list[dict], before: dict[int, str], module: nn.Module) -> list[dict]:
    """Parameter groups re-pointed at `module`'s current parameters (FSDP2 replaces them with sharded ones): `before`
    maps id(parameter) -> name as it was when the groups were made (named_parameters() of the same module)."""
    now = {name.removeprefix("module."): p for name, p in module.named_parameters()}
    out = []
    for g in groups:
        params = [now[before[id(p)]] for p in g["params"]]
        out.append({**g, "params": params})
    return out


def full_state_dict(module: nn.Module) -> dict:
    """Full (unsharded) CPU tensors on rank 0 ({} elsewhere); plain state_dict without a process group."""
    if rank_world()[1] == 1:
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
