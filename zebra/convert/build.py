"""Build an initialised hybrid student from a teacher and save it (SPEC 1 step 1, 3.1, 3.2).

    report = convert("smollm2-135m-instruct", "student", mla_layers="0,6,12,18,24,29", attention_layers="none",
                     kv_rank=64)

Steps: validate the output location and the layout (cheap, before any weight is read), load the teacher,
construct ZebraForCausalLM under a fixed seed (its default init), copy every weight the student shares with
the teacher, SVD-initialise MLA layers (3.1) and map attention into Mamba2 layers (3.2), check that every
student parameter was either mapped or deliberately left at its default init, then save into a temporary
directory beside `out_dir` and rename it into place, so a failure never leaves a partial output.
`zebra_convert.json` beside the weights records the flags, the KV accounting and per-layer SVD errors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..errors import ZebraError
from . import layout
from .mamba2_init import DEFAULT_INIT as MAMBA2_DEFAULT_INIT
from .mamba2_init import GATE_BIAS
from .mamba2_init import init_mamba2_from_attention
from .svd_mla import (
    init_mla_from_attention,
    matrix_rank_error,
    rope_pairs_by_frequency,
    rope_pairs_by_norm,
    svd_reconstruction_error,
)
from .teacher import load_generation_config, load_teacher, load_teacher_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def kv_message(summary: dict) -> str:
    return (f"KV cache: {summary['student_per_token']} values/token vs {summary['teacher_per_token']} "
            f"for the teacher ({summary['kv_percent']:.2f}%)")


# ---- output location ---------------------------------------------------------------------------------------
def check_out_dir(out: Path, force: bool, teacher: str) -> None:
    """Refuse an unusable output location before any heavy work."""
    if out.exists():
        if not out.is_dir():
            raise ZebraError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise ZebraError(f"--out {out} exists and is not empty (pass --force to replace it)")
    t = Path(teacher).expanduser()
    if t.exists():
        t, o = t.resolve(), out.resolve()
        if o == t or o in t.parents:
            raise ZebraError(f"--out {out} would overwrite the teacher {teacher}")
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ZebraError(f"cannot create --out {out}: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ZebraError(f"cannot create --out {out}: no write permission in {anc}")


# ---- teacher tensors ---------------------------------------------------------------------------------------
def expected_teacher_tensors(cfg) -> dict[str, tuple[int, ...]]:
    """name -> shape of every teacher tensor the conversion reads (HF Llama/Qwen2/Qwen3/Mistral names)."""
    d, V, I = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    n_h, n_kv, d_h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    exp = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        exp["lm_head.weight"] = (V, d)
    for i, kind in enumerate(cfg.mixer_types):
        p = f"model.layers.{i}."
        exp.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                    p + "mlp.gate_proj.weight": (I, d), p + "mlp.up_proj.weight": (I, d),
                    p + "mlp.down_proj.weight": (d, I)})
        if cfg.mlp_bias:
            exp.update({p + "mlp.gate_proj.bias": (I,), p + "mlp.up_proj.bias": (I,), p + "mlp.down_proj.bias": (d,)})
        a = p + "self_attn."
        exp.update({a + "q_proj.weight": (n_h * d_h, d), a + "k_proj.weight": (n_kv * d_h, d),
                    a + "v_proj.weight": (n_kv * d_h, d), a + "o_proj.weight": (d, n_h * d_h)})
        if cfg.attention_bias:
            exp.update({a + "q_proj.bias": (n_h * d_h,), a + "k_proj.bias": (n_kv * d_h,),
                        a + "v_proj.bias": (n_kv * d_h,)})
        if cfg.qk_norm and kind == "attention":
            exp.update({a + "q_norm.weight": (d_h,), a + "k_norm.weight": (d_h,)})
    return exp


def check_teacher_tensors(cfg, state: dict[str, torch.Tensor]) -> None:
    exp = expected_teacher_tensors(cfg)
    missing = [k for k in exp if k not in state]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ZebraError(f"the teacher's weights are missing {len(missing)} tensor(s) its config implies: {shown}")
    wrong = [f"{k} is {tuple(state[k].shape)}, expected {s}" for k, s in exp.items() if tuple(state[k].shape) != s]
    if wrong:
        raise ZebraError("teacher tensor shapes do not match its config: " + "; ".join(wrong[:4]))


# ---- weight mapping ----------------------------------------------------------------------------------------
def map_weights(cfg, state: dict[str, torch.Tensor], student: dict[str, torch.Tensor], init: str = "svd",
                conv_init: str = "identity"):
    """Student tensors from teacher tensors. conv_init: Mamba2's short conv as the identity (last tap 1, others and
    bias 0, so x / B / C start as silu of the teacher's V / K / Q) or "random" (Mamba2's default init, the paper).

    student: the freshly constructed model's parameters (name -> tensor), read for Mamba2's default z/dt rows.
    Returns (mapped name -> tensor, names left at their default init, per-MLA-layer SVD errors, teacher names used).
    """
    mapped: dict[str, torch.Tensor] = {}
    default: set[str] = set()
    errors: dict[int, dict] = {}
    used: set[str] = set()
    n_h, n_kv, d_h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ZebraError(f"the teacher has no tensor {name}, which the student needs")
        used.add(name)
        return state[name]

    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        if name in student:  # a tied lm_head is not listed: it is embed_tokens
            mapped[name] = take(name)
    for i, kind in enumerate(cfg.mixer_types):
        p = f"model.layers.{i}."
        for name in student:
            if name.startswith(p) and (".mlp." in name or "layernorm" in name):
                mapped[name] = take(name)
        a = p + "self_attn."
        if kind == "attention":
            for name in student:
                if name.startswith(a):
                    mapped[name] = take(name)
            continue
        q_w, k_w, v_w, o_w = (take(a + f"{x}_proj.weight") for x in "qkvo")
        q_b, k_b, v_b = ((take(a + f"{x}_proj.bias") if cfg.attention_bias else None) for x in "qkv")
        if kind == "mla":
            if init == "random":
                default.update(n for n in student if n.startswith(a))
                continue
            r_kv, r_q = cfg.kv_lora_rank, cfg.q_lora_rank
            pairs = (cfg.mla_rope_pairs or {}).get(str(i))
            mla = init_mla_from_attention(q_w, k_w, v_w, n_h, n_kv, d_h, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                          r_kv, r_q, q_b=q_b, k_b=k_b, v_b=v_b, rope_pairs=pairs)
            mla["o_proj.weight"] = o_w
            mapped.update({a + k: v for k, v in mla.items()})
            errors[i] = {"kv": svd_reconstruction_error(k_w, v_w, r_kv),
                         "q": matrix_rank_error(q_w.T, r_q) if r_q is not None else 0.0}
        else:  # mamba2
            m = p + "mamba."
            layer_state = {n[len(m):]: t for n, t in student.items() if n.startswith(m)}
            new = init_mamba2_from_attention(layer_state, q_w, k_w, v_w, o_w, n_h, n_kv, d_h, q_b=q_b, k_b=k_b, v_b=v_b)
            if "z_bias" in layer_state:  # gate_init "constant": zero z rows, positive bias (model config mamba_z_bias)
                new["in_proj.weight"][: cfg.mamba_d_inner] = 0
                new["z_bias"] = torch.full_like(layer_state["z_bias"], GATE_BIAS)
            if conv_init == "identity":
                w = torch.zeros_like(layer_state["conv1d.weight"])
                w[:, 0, -1] = 1.0  # y_t = x_t: the causal conv's last tap multiplies the current token
                new["conv1d.weight"] = w
                new["conv1d.bias"] = torch.zeros_like(layer_state["conv1d.bias"])
            mapped.update({m + k: v for k, v in new.items()})
            default.update(m + k for k in MAMBA2_DEFAULT_INIT if m + k in student and m + k not in mapped)
    return mapped, default, errors, used


def apply_weights(model: torch.nn.Module, mapped: dict[str, torch.Tensor], default: set[str]) -> None:
    """Copy mapped tensors into the model; fail loudly on any parameter neither mapped nor default by design."""
    params = dict(model.named_parameters())  # tied lm_head appears once, as embed_tokens
    extra = sorted(set(mapped) - set(params))
    if extra:
        raise ZebraError(f"internal: mapped tensors have no student parameter: {', '.join(extra[:8])}")
    leftover = sorted(set(params) - set(mapped) - default)
    if leftover:
        raise ZebraError("internal: student parameters neither mapped nor default-initialised: "
                         + ", ".join(leftover[:8]))
    with torch.no_grad():
        for name, t in mapped.items():
            p = params[name]
            if tuple(p.shape) != tuple(t.shape):
                raise ZebraError(f"internal: {name} is {tuple(p.shape)} in the student but the mapping gives "
                                 f"{tuple(t.shape)}")
            p.copy_(t.to(dtype=p.dtype))


# ---- the whole conversion ----------------------------------------------------------------------------------
def _as_indices(spec, num_layers: int, flag: str) -> list[int]:
    if spec is None or isinstance(spec, str):
        return layout.parse_layer_spec(spec, num_layers, flag)
    return layout.parse_layer_spec(",".join(str(int(i)) for i in spec) or "none", num_layers, flag)


def build_student_config(teacher: str, mla_layers, attention_layers, kv_rank=layout.DEFAULT_KV_RANK, q_rank=None,
                         rope_dim=None, nope_dim=None, drop_qk_norm=False, teacher_cfg: dict | None = None):
    """(teacher config dict, ZebraConfig) from the teacher's config alone; shared by `zebra convert` and `zebra kv`."""
    tcfg = teacher_cfg if teacher_cfg is not None else load_teacher_config(teacher)
    L = tcfg.get("num_hidden_layers")
    if not isinstance(L, int) or L <= 0:
        raise ZebraError(f"teacher config has no valid num_hidden_layers (got {L!r})")
    attn = _as_indices(attention_layers, L, "--attention-layers")
    if mla_layers is None:
        if not attn:
            raise ZebraError("--mla-layers is required (layers to make MLA: indices, 'all' or 'none'; every other "
                             "layer not in --attention-layers becomes Mamba2)")
        mla_layers = "none"
    mla = _as_indices(mla_layers, L, "--mla-layers")
    cfg = layout.student_config_from_teacher(tcfg, mla, attn, kv_rank=kv_rank, q_rank=q_rank, rope_dim=rope_dim,
                                             nope_dim=nope_dim, drop_qk_norm=drop_qk_norm)
    return tcfg, cfg


def convert(teacher: str, out_dir, mla_layers, attention_layers=None, kv_rank=layout.DEFAULT_KV_RANK, q_rank=None,
            rope_dim=None, nope_dim=None, init: str = "svd", seed: int = 0, dtype: str | torch.dtype = "float32",
            drop_qk_norm: bool = False, force: bool = False, rope_select: str = "freq",
            conv_init: str = "identity", gate_init: str = "constant") -> dict:
    """Convert `teacher` into a hybrid student saved at `out_dir`; returns the report written to zebra_convert.json."""
    torch_dtype = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if torch_dtype is None:
        raise ZebraError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir).expanduser()
    check_out_dir(out, force, teacher)
    t0 = time.time()
    model, tokenizer, report = build_student(teacher, mla_layers, attention_layers, kv_rank, q_rank, rope_dim,
                                             nope_dim, init, seed, drop_qk_norm, rope_select, conv_init, gate_init)
    report["flags"]["dtype"] = str(torch_dtype).replace("torch.", "")
    model = model.to(torch_dtype)
    gen = load_generation_config(teacher)
    if gen is not None:
        model.generation_config = gen
    _save_atomically(out, force, model, tokenizer, report)
    report["seconds"] = round(time.time() - t0, 2)
    return report


ROPE_SELECT = ("freq", "norm", "last")
CONV_INIT = ("identity", "random")
GATE_INIT = ("constant", "random")


def build_student(teacher: str, mla_layers, attention_layers=None, kv_rank=layout.DEFAULT_KV_RANK, q_rank=None,
                  rope_dim=None, nope_dim=None, init: str = "svd", seed: int = 0, drop_qk_norm: bool = False,
                  rope_select: str = "freq", conv_init: str = "identity", gate_init: str = "constant"):
    """The initialised student in memory (fp32): (ZebraForCausalLM, tokenizer, report dict).

    rope_select: MLA's decoupled RoPE dims as whole rotary pairs of the teacher's heads at the teacher's
    frequencies, the fastest-turning ones ("freq", svd_mla.rope_pairs_by_frequency) or the heaviest by weight norm
    ("norm", svd_mla.rope_pairs_by_norm, MHA2MLA's criterion); or the last d_r dims with frequencies recomputed
    over d_r ("last", the paper). conv_init: see map_weights. gate_init: Mamba2's gate z starts constant (W_z = 0
    plus a learnable bias, "constant") or as Mamba2's random projection ("random", the paper); a random gate
    multiplies every channel by a random factor and leaves the initialised mixer's output uncorrelated with the
    teacher's attention output (results/init-compare)."""
    if init not in ("svd", "random"):
        raise ZebraError(f"--init must be 'svd' or 'random', got {init!r}")
    if rope_select not in ROPE_SELECT:
        raise ZebraError(f"--rope-select must be one of {', '.join(ROPE_SELECT)}, got {rope_select!r}")
    if conv_init not in CONV_INIT:
        raise ZebraError(f"--conv-init must be one of {', '.join(CONV_INIT)}, got {conv_init!r}")
    if gate_init not in GATE_INIT:
        raise ZebraError(f"--gate-init must be one of {', '.join(GATE_INIT)}, got {gate_init!r}")
    _, cfg = build_student_config(teacher, mla_layers, attention_layers, kv_rank, q_rank, rope_dim, nope_dim,
                                  drop_qk_norm)

    tcfg, state, tokenizer = load_teacher(teacher)
    check_teacher_tensors(cfg, state)
    cfg.mamba_z_bias = gate_init == "constant" and "mamba2" in cfg.mixer_types
    if rope_select != "last" and init == "svd":
        from ..model.common import rope_inv_freq

        n_h, n_kv, d_h, d_r = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.qk_rope_head_dim
        inv_freq = rope_inv_freq(cfg.rope_config, d_h)

        rope_pairs = {}
        for i, t in enumerate(cfg.mixer_types):
            if t != "mla":
                continue
            if rope_select == "freq":
                rope_pairs[str(i)] = rope_pairs_by_frequency(inv_freq, d_r)
            else:
                rope_pairs[str(i)] = rope_pairs_by_norm(state[f"model.layers.{i}.self_attn.q_proj.weight"],
                                                        state[f"model.layers.{i}.self_attn.k_proj.weight"],
                                                        n_h, n_kv, d_h, d_r)
        cfg.mla_rope_pairs = rope_pairs or None

    from ..model.hybrid import ZebraForCausalLM  # heavy import, only once the cheap checks passed

    torch.manual_seed(seed)
    model = ZebraForCausalLM(cfg).to(torch.float32)
    student = dict(model.named_parameters())
    mapped, default, svd_errors, used = map_weights(cfg, state, {k: v.detach() for k, v in student.items()}, init,
                                                    conv_init)
    apply_weights(model, mapped, default)
    unused = sorted(k for k in set(state) - used if not k.endswith("rotary_emb.inv_freq")
                    and not (cfg.tie_word_embeddings and k == "lm_head.weight")
                    and not k.endswith(("q_norm.weight", "k_norm.weight")))
    if unused:
        layout.warn(f"{len(unused)} teacher tensor(s) have no place in the student and were ignored: "
                    + ", ".join(unused[:6]) + (" ..." if len(unused) > 6 else ""))
    del state, mapped

    summary = cfg.kv_summary()
    idx = lambda kind: [i for i, t in enumerate(cfg.mixer_types) if t == kind]  # noqa: E731
    report = {
        "teacher": str(teacher),
        "teacher_model_type": cfg.teacher_model_type,
        "flags": {"mla_layers": idx("mla"), "attention_layers": idx("attention"), "kv_rank": cfg.kv_lora_rank,
                  "q_rank": cfg.q_lora_rank, "rope_dim": cfg.qk_rope_head_dim, "nope_dim": cfg.qk_nope_head_dim,
                  "init": init, "seed": seed, "drop_qk_norm": drop_qk_norm, "rope_select": rope_select,
                  "conv_init": conv_init, "gate_init": gate_init},
        "mla_rope_pairs": cfg.mla_rope_pairs,
        "mixer_types": list(cfg.mixer_types),
        "mamba2_layers": idx("mamba2"),
        "kv": summary,
        "kv_message": kv_message(summary),
        # Relative Frobenius error of the rank-r [W_K, W_V] (and W_Q) reconstruction, per MLA layer (SPEC 3.1).
        "svd_error": {str(i): e for i, e in svd_errors.items()},
        "default_initialised": sorted(default),
        "teacher_tensors_ignored": unused,
    }
    return model, tokenizer, report


def save_model(model, tokenizer, out_dir, report: dict | None = None, force: bool = True,
               dtype: torch.dtype | None = None) -> None:
    """Save a (stage's) model atomically: temp dir beside out_dir, then rename; in `dtype` when given (the model
    itself is not changed)."""
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        import copy

        model = copy.deepcopy(model).to(dtype)
    _save_atomically(Path(out_dir), force, model, tokenizer, report if report is not None else {})


class _quiet_progress:
    """Hide transformers' per-shard progress bars while saving (they interleave with our own output)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._hf, self._was = hf_logging, hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        if self._was:
            self._hf.enable_progress_bar()


def _normal_permissions(d: Path) -> None:
    """mkdtemp makes the directory 0700 (and some writers make files 0600): give the output the user's umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(d, 0o777 & ~mask)
    for f in d.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)


def _save_atomically(out: Path, force: bool, model, tokenizer, report: dict) -> None:
    """save_pretrained into a temp dir beside `out`, then rename: a crash never leaves a half-written `out`."""
    created: list[Path] = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        if getattr(model.config, "model_type", None) == "zebra":  # the modeling code travels with the weights
            from ..model.bundle import write_bundle

            model.config.auto_map = write_bundle(tmp)
        with _quiet_progress():
            model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "zebra_convert.json").write_text(json.dumps(report, indent=2) + "\n")
        _normal_permissions(tmp)
        if out.exists():
            if not force and any(out.iterdir()):
                raise ZebraError(f"--out {out} appeared while converting and is not empty")
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, backup / out.name)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
        tmp = None
    except OSError as e:
        raise ZebraError(f"cannot write the student to {out}: {e}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            for d in created:  # innermost first: remove only the parents we made, and only if still empty
                try:
                    d.rmdir()
                except OSError:
                    break
