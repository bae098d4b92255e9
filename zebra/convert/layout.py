"""Student layout: which layer gets which mixer, and the ZebraConfig built from a teacher's HF config (SPEC 2, 3, 9).

    parse_layer_spec("0,5,10,14", 16, "--mla-layers")  -> [0, 5, 10, 14]
    layer_types_from_flags(16, [0, 5], [])              -> ["mla", "mamba2", ..., "mla", "mamba2", ...]
    student_config_from_teacher(teacher_config_dict, mla_layers=[0, 5], attention_layers=[], kv_rank=128, ...)

Everything the student cannot express (another architecture, a RoPE variant, biases on o_proj, Qwen3's q/k
RMSNorm on a layer that loses softmax attention) is refused here with a ZebraError that names the feature,
before any weight is read. Works from the config alone, so `zebra kv` shares it with `zebra convert`.
"""

from __future__ import annotations

import sys

from ..config import ZebraConfig
from ..errors import ZebraError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_KV_RANK = 128
DEFAULT_ROPE_DIM = 32


def warn(msg: str) -> None:
    """User-facing warning: one line on stderr (the CLI has no logging setup, and a traceback-style
    warnings.warn line would bury the message)."""
    print(f"zebra: warning: {msg}", file=sys.stderr)


def parse_layer_spec(spec: str | None, num_layers: int, flag_name: str) -> list[int]:
    """'0,5,10' | 'all' | 'none' | '' -> sorted 0-based layer indices; ZebraError naming `flag_name` otherwise."""
    if spec is None:
        return []
    text = str(spec).strip().lower()
    if text in ("", "none"):
        return []
    if text == "all":
        return list(range(num_layers))
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ZebraError(f"{flag_name}: empty entry in {spec!r} (expected comma-separated layer indices)")
        try:
            idx = int(item)
        except ValueError:
            raise ZebraError(f"{flag_name}: {item!r} is not a layer index (expected comma-separated integers, "
                             f"'all' or 'none')") from None
        if idx < 0:
            raise ZebraError(f"{flag_name}: layer index {idx} is negative (indices are 0-based, 0..{num_layers - 1})")
        if idx >= num_layers:
            raise ZebraError(f"{flag_name}: layer index {idx} is out of range for a {num_layers}-layer teacher "
                             f"(valid: 0..{num_layers - 1})")
        if idx in out:
            raise ZebraError(f"{flag_name}: layer {idx} is listed twice")
        out.append(idx)
    return sorted(out)


def layer_types_from_flags(num_layers: int, mla: list[int], attention: list[int]) -> list[str]:
    """Per-layer mixer types: listed layers become "mla" / "attention", every other layer "mamba2"."""
    both = sorted(set(mla) & set(attention))
    if both:
        raise ZebraError(f"layer(s) {both} are in both --mla-layers and --attention-layers; each layer gets one mixer")
    types = ["mamba2"] * num_layers
    for i in mla:
        types[i] = "mla"
    for i in attention:
        types[i] = "attention"
    return types


def rope_parameters_from_teacher(cfg: dict) -> dict:
    """{"rope_type", "rope_theta", + scaling keys} from a v5 `rope_parameters` dict or v4 rope_theta/rope_scaling."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp and "rope_type" not in rp and "type" not in rp \
            and all(isinstance(v, dict) for v in rp.values()):
        # v5 per-layer-type RoPE (e.g. {"full_attention": {...}, "sliding_attention": {...}}): the student has one.
        raise ZebraError(f"per-layer-type RoPE parameters ({sorted(rp)}) are not supported")
    if isinstance(rp, dict) and rp:
        params = dict(rp)
    else:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ZebraError(f"RoPE type '{rope_type}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    partial = params.pop("partial_rotary_factor", None)
    if partial is None:
        partial = cfg.get("partial_rotary_factor")
    if partial is not None and float(partial) != 1.0:
        raise ZebraError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported")
    if params.get("rope_theta") is None:
        params["rope_theta"] = cfg.get("rope_theta", 10000.0)
    params["rope_theta"] = float(params["rope_theta"])
    return {"rope_type": rope_type, **params}


def _teacher_features(cfg: dict, model_type: str) -> dict:
    """Bias / norm flags of the teacher's attention, per architecture (they differ in what the config means)."""
    if model_type == "qwen2":
        # Qwen2 always has q/k/v biases and no o_proj bias; its config has no flag for it.
        return {"attention_bias": True, "o_bias": False, "qk_norm": False}
    flag = bool(cfg.get("attention_bias", False))
    if model_type == "mistral":
        return {"attention_bias": False, "o_bias": False, "qk_norm": False}
    # llama and qwen3: attention_bias puts a bias on q, k, v *and* o_proj.
    return {"attention_bias": flag, "o_bias": flag, "qk_norm": model_type == "qwen3"}


def student_config_from_teacher(
    teacher_cfg: dict,
    mla_layers: list[int],
    attention_layers: list[int],
    kv_rank: int | None = DEFAULT_KV_RANK,
    q_rank: int | None = None,
    rope_dim: int | None = None,
    nope_dim: int | None = None,
    drop_qk_norm: bool = False,
) -> ZebraConfig:
    """ZebraConfig for a hybrid of `teacher_cfg` (an HF config.json dict) with the given MLA / attention layers,
    all other layers Mamba2. Raises ZebraError for anything the student cannot represent."""
    model_type = teacher_cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ZebraError(f"unsupported architecture '{model_type}' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        d = int(teacher_cfg["hidden_size"])
        L = int(teacher_cfg["num_hidden_layers"])
        n_h = int(teacher_cfg["num_attention_heads"])
        vocab = int(teacher_cfg["vocab_size"])
        inter = int(teacher_cfg["intermediate_size"])
    except KeyError as e:
        raise ZebraError(f"teacher config has no '{e.args[0]}'") from None
    n_kv = int(teacher_cfg.get("num_key_value_heads") or n_h)
    d_h = int(teacher_cfg.get("head_dim") or d // n_h)
    if n_h % n_kv:
        raise ZebraError(f"num_attention_heads ({n_h}) is not a multiple of num_key_value_heads ({n_kv})")

    layer_types = layer_types_from_flags(L, mla_layers, attention_layers)
    has_mla = "mla" in layer_types
    lossy = [i for i, t in enumerate(layer_types) if t != "attention"]

    feats = _teacher_features(teacher_cfg, model_type)
    if feats["o_bias"]:
        raise ZebraError(f"attention biases on o_proj ({model_type} attention_bias=true) are not supported: "
                         "the student's output projection has no bias")
    if feats["qk_norm"] and lossy and not drop_qk_norm:
        raise ZebraError(
            f"the teacher applies q/k RMSNorm (Qwen3) per head, which neither MLA's linear latent cache nor "
            f"Mamba2 can represent (layers {lossy}). Pass --drop-qk-norm to drop it on those layers "
            "(distillation must repair the difference), or keep them as --attention-layers")
    if feats["qk_norm"] and lossy and drop_qk_norm:
        warn(f"dropping the teacher's q/k RMSNorm (Qwen3) on layers {lossy}; the init is further from the teacher "
             "there and distillation must repair it (attention layers keep the norm)")

    max_pos = int(teacher_cfg.get("max_position_embeddings") or 8192)
    window = teacher_cfg.get("sliding_window")
    uses_window = window is not None and (model_type == "mistral" or teacher_cfg.get("use_sliding_window"))
    if uses_window and int(window) < max_pos:
        warn(f"the teacher uses sliding-window attention ({window} tokens); the student's attention / MLA layers "
             "attend to the full context")
    hidden_act = teacher_cfg.get("hidden_act", "silu")
    if hidden_act not in ("silu", "swish"):
        warn(f"teacher MLP activation is {hidden_act!r} (Llama uses silu); copied as is")

    rope = rope_parameters_from_teacher(teacher_cfg)

    # ---- MLA geometry (SPEC 2): d_nope + d_r <= d_h, d_v = d_h, ranks no larger than the matrices allow ----
    if rope_dim is None:
        rope_dim = min(DEFAULT_ROPE_DIM, d_h // 2)
    if nope_dim is None:
        nope_dim = d_h - rope_dim
    if kv_rank is None:
        kv_rank = DEFAULT_KV_RANK
    if has_mla:
        if rope_dim <= 0 or rope_dim % 2 or rope_dim > d_h:
            raise ZebraError(f"--rope-dim {rope_dim} must be a positive even number <= head_dim ({d_h})")
        if nope_dim < 0 or nope_dim + rope_dim > d_h:
            raise ZebraError(f"--nope-dim {nope_dim} + --rope-dim {rope_dim} must be <= head_dim ({d_h}); "
                             "d_v is the teacher's head_dim")
        kv_max = min(d, 2 * n_kv * d_h)
        if kv_rank <= 0 or kv_rank > kv_max:
            raise ZebraError(f"--kv-rank {kv_rank} must be in 1..{kv_max} = min(hidden {d}, 2*n_kv*d_h "
                             f"{2 * n_kv * d_h}), the rank of [W_K, W_V]")
        q_max = min(d, n_h * d_h)
        if q_rank is not None and (q_rank <= 0 or q_rank > q_max):
            raise ZebraError(f"--q-rank {q_rank} must be in 1..{q_max} = min(hidden {d}, n_h*d_h {n_h * d_h}), "
                             "the rank of W_Q (or omit it for no query compression)")

    token_ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    extra = {k: teacher_cfg[k] for k in token_ids if teacher_cfg.get(k) is not None}
    try:
        return ZebraConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=inter,
            num_hidden_layers=L,
            num_attention_heads=n_h,
            num_key_value_heads=n_kv,
            head_dim=d_h,
            hidden_act=hidden_act,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(teacher_cfg.get("rms_norm_eps", 1e-6)),
            rope_config=rope,
            attention_bias=feats["attention_bias"],
            mlp_bias=bool(teacher_cfg.get("mlp_bias", False)),
            qk_norm=feats["qk_norm"],
            mixer_types=layer_types,
            kv_lora_rank=kv_rank,
            q_lora_rank=q_rank,
            qk_rope_head_dim=rope_dim,
            qk_nope_head_dim=nope_dim,
            teacher_model_type=model_type,
            initializer_range=float(teacher_cfg.get("initializer_range", 0.02)),
            tie_word_embeddings=bool(teacher_cfg.get("tie_word_embeddings", False)),
            **extra,
        )
    except ValueError as e:
        raise ZebraError(f"invalid student configuration: {e}") from None


def add_layout_arguments(parser) -> None:
    """The layout flags shared by `zebra convert` and `zebra kv` (same names, same defaults)."""
    g = parser.add_argument_group("student layout (SPEC 2, 9)")
    g.add_argument("--mla-layers", default=None, metavar="SPEC",
                   help="0-based layers that become MLA: comma-separated indices (e.g. 0,5,10,14), 'all' or 'none'. "
                        "Required unless --attention-layers is given (then it defaults to none), because every layer "
                        "not listed here or in --attention-layers becomes Mamba2: 'none' gives the pure-Mamba2 "
                        "model, 'all' the pure-MLA model")
    g.add_argument("--attention-layers", default="none", metavar="SPEC",
                   help="layers that keep the teacher's own attention unchanged (default: none)")
    g.add_argument("--kv-rank", type=int, default=DEFAULT_KV_RANK, metavar="N",
                   help=f"MLA KV latent rank r_kv, at most min(hidden, 2*n_kv*d_h) (default: {DEFAULT_KV_RANK})")
    g.add_argument("--q-rank", type=int, default=None, metavar="N",
                   help="MLA query latent rank r_q, at most min(hidden, n_h*d_h) "
                        "(default: no query compression, which keeps the teacher's queries exactly)")
    g.add_argument("--rope-dim", type=int, default=None, metavar="N",
                   help=f"decoupled RoPE dim d_r per head, even (default: min({DEFAULT_ROPE_DIM}, head_dim/2))")
    g.add_argument("--nope-dim", type=int, default=None, metavar="N",
                   help="non-RoPE q/k dim d_nope per head (default: head_dim - rope dim, so d_nope + d_r = d_h)")
    g.add_argument("--drop-qk-norm", action="store_true",
                   help="allow a Qwen3 teacher: drop its q/k RMSNorm on MLA / Mamba2 layers (attention layers keep it)")
