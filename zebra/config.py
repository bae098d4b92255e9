"""ZebraConfig: the hybrid model's configuration, and KV-cache accounting (SPEC sections 2, 3.2, 9).

One flat config holds the teacher family's shapes (embeddings, norms, MLP, RoPE) plus a per-layer mixer
type from {"mla", "mamba2", "attention"} and the MLA / Mamba2 geometry:

  mla        DeepSeek-V2-style latent attention that keeps the teacher's n_kv KV groups (SPEC 2)
  mamba2     MambaInLlama geometry: d_inner = n_h*d_h, nheads = n_h, headdim = d_state = d_h,
             d_xb = n_kv*d_h, d_conv = 4 (SPEC 3.2)
  attention  the teacher's own GQA attention, unchanged (baselines and exact parity tests)

KV accounting counts cached *values* per token summed over all layers (element counts, not bytes):
teacher 2*n_kv*d_h per layer, MLA r_kv + d_r, Mamba2 0 (its state does not grow with length).
"""

from __future__ import annotations

from transformers import PretrainedConfig

MIXER_TYPES = ("mla", "mamba2", "attention")


class ZebraConfig(PretrainedConfig):
    model_type = "zebra"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int = 512,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        rms_norm_eps: float = 1e-5,
        rope_config: dict | None = None,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        mixer_types: list[str] | None = None,
        kv_lora_rank: int = 64,
        q_lora_rank: int | None = None,
        qk_rope_head_dim: int = 32,
        qk_nope_head_dim: int | None = None,
        mla_rope_pairs: dict | None = None,
        mamba_d_conv: int = 4,
        mamba_chunk_size: int = 64,
        mamba_dt_min: float = 0.001,
        mamba_dt_max: float = 0.1,
        mamba_dt_init_floor: float = 1e-4,
        mamba_z_bias: bool = False,
        backend: str = "auto",
        teacher_model_type: str | None = None,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        # Our own key: transformers validates and rewrites `rope_parameters` / `rope_scaling` differently
        # across versions. Same content as a v5 `rope_parameters` dict (rope_type, rope_theta, scaling keys).
        if rope_config is None:
            rope_config = kwargs.pop("rope_parameters", None)
        self.rope_config = dict(rope_config or {"rope_type": "default", "rope_theta": 10000.0})
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        # Not `layer_types`: transformers reserves and validates that name for its own attention kinds.
        if mixer_types is None:
            mixer_types = kwargs.pop("layer_types", None)
        self.mixer_types = list(mixer_types) if mixer_types is not None else ["attention"] * num_hidden_layers
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim if qk_nope_head_dim is not None else self.head_dim - qk_rope_head_dim
        # {layer index (str): the teacher's rotary pairs that are the layer's RoPE dims}; layers not listed (or
        # None) use the paper's layout: frequencies recomputed over qk_rope_head_dim dims
        self.mla_rope_pairs = {str(k): [int(p) for p in v] for k, v in mla_rope_pairs.items()} if mla_rope_pairs else None
        self.mamba_d_conv = mamba_d_conv
        self.mamba_chunk_size = mamba_chunk_size
        self.mamba_dt_min = mamba_dt_min
        self.mamba_dt_max = mamba_dt_max
        self.mamba_dt_init_floor = mamba_dt_init_floor
        self.mamba_z_bias = mamba_z_bias  # a learnable bias on the gate z (a constant gate at init, zebra.convert)
        self.backend = backend
        self.teacher_model_type = teacher_model_type
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate()

    # ---- derived geometry -------------------------------------------------------------------------
    @property
    def v_head_dim(self) -> int:
        return self.head_dim  # d_v = d_h (SPEC 2)

    @property
    def mamba_d_inner(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def mamba_d_xb(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def mamba_d_state(self) -> int:
        return self.head_dim

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        L = self.num_hidden_layers
        if len(self.mixer_types) != L:
            raise ValueError(f"mixer_types has {len(self.mixer_types)} entries but num_hidden_layers is {L}")
        bad = sorted({t for t in self.mixer_types if t not in MIXER_TYPES})
        if bad:
            raise ValueError(f"unknown mixer type(s) {bad}; expected one of {list(MIXER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if "mla" in self.mixer_types:
            if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
                raise ValueError(f"MLA rope dim must be a positive even number, got {self.qk_rope_head_dim}")
            if self.qk_nope_head_dim < 0:
                raise ValueError(f"MLA nope dim must be >= 0, got {self.qk_nope_head_dim}")
            if self.kv_lora_rank <= 0:
                raise ValueError(f"MLA kv rank must be positive, got {self.kv_lora_rank}")
            if self.q_lora_rank is not None and self.q_lora_rank <= 0:
                raise ValueError(f"MLA q rank must be positive or None, got {self.q_lora_rank}")
            for k, pairs in (self.mla_rope_pairs or {}).items():
                if 2 * len(pairs) != self.qk_rope_head_dim or len(set(pairs)) != len(pairs) or not all(
                        0 <= p < self.head_dim // 2 for p in pairs):
                    raise ValueError(f"mla_rope_pairs[{k}] = {pairs}: need {self.qk_rope_head_dim // 2} distinct "
                                     f"rotary pairs in [0, {self.head_dim // 2})")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {self.backend!r}")

    # ---- KV accounting (SPEC 9) -------------------------------------------------------------------
    def kv_values_per_token_per_layer(self) -> list[int]:
        """Cache values stored per token by each layer (Mamba2's fixed-size state is not a KV cache)."""
        per = {
            "attention": 2 * self.num_key_value_heads * self.head_dim,
            "mla": self.kv_lora_rank + self.qk_rope_head_dim,
            "mamba2": 0,
        }
        return [per[t] for t in self.mixer_types]

    def teacher_kv_values_per_token(self) -> int:
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim

    def kv_summary(self) -> dict:
        student = sum(self.kv_values_per_token_per_layer())
        teacher = self.teacher_kv_values_per_token()
        return {
            "teacher_per_token": teacher,
            "student_per_token": student,
            "kv_percent": 100.0 * student / teacher,
            "layers": {t: self.mixer_types.count(t) for t in MIXER_TYPES},
        }
