"""`zebra convert`: build an initialised hybrid student from a teacher and save it (SPEC 1 step 1, 3).

    zebra convert --teacher smollm2-135m-instruct --mla-layers 0,6,12,18,24,29 --kv-rank 64 --out student
    zebra convert --teacher path/to/hf_dir --mla-layers all --out pure_mla       # the pure-MLA model for ILD
    zebra convert --teacher path/to/hf_dir --mla-layers none --out pure_mamba2   # the pure-Mamba2 model

The output loads with `import zebra; AutoModelForCausalLM.from_pretrained(out)`; zebra_convert.json beside
the weights records the flags, the KV accounting and each MLA layer's SVD reconstruction error.
"""

from __future__ import annotations

from ..convert.layout import add_layout_arguments


def add_arguments(parser) -> None:
    parser.add_argument("--teacher", required=True, metavar="PATH_OR_NAME",
                        help="HF model directory (config.json + safetensors/bin), a .gguf file, the embedded teacher "
                             "name (smollm2-135m-instruct) or a hub id (needs network)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory; must not exist or be empty unless --force")
    add_layout_arguments(parser)
    g = parser.add_argument_group("initialisation and output")
    g.add_argument("--init", choices=("svd", "random"), default="svd",
                   help="svd: MLA layers from the teacher's attention by SVD (SPEC 3.1); random: MLA layers keep "
                        "the model's default init (baseline). Mamba2 layers always get the SPEC 3.2 init "
                        "(default: svd)")
    g.add_argument("--rope-select", choices=("freq", "norm", "last"), default="freq",
                   help="MLA's RoPE dims: whole rotary pairs of the teacher's heads at the teacher's frequencies, "
                        "the fastest-turning ones (freq) or the heaviest by weight norm (norm, MHA2MLA), or the last "
                        "d_r dims with frequencies recomputed over d_r, as the paper (last) (default: freq; RESULTS.md "
                        "has the comparison)")
    g.add_argument("--conv-init", choices=("identity", "random"), default="identity",
                   help="Mamba2's short conv: the identity (x, B, C start as silu of the teacher's V, K, Q) or "
                        "Mamba2's random default, as the paper (default: identity; RESULTS.md has the comparison)")
    g.add_argument("--gate-init", choices=("constant", "random"), default="constant",
                   help="Mamba2's gate z: constant at init (zero z rows + a learnable bias) or Mamba2's random "
                        "projection, as the paper (default: constant; RESULTS.md has the comparison)")
    g.add_argument("--seed", type=int, default=0, help="seed for the default-initialised parameters (default: 0)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the saved weights (default: float32)")
    g.add_argument("--force", action="store_true", help="replace a non-empty --out directory")


def run(args) -> int:
    from ..convert.build import convert

    report = convert(args.teacher, args.out, args.mla_layers, args.attention_layers, kv_rank=args.kv_rank,
                     q_rank=args.q_rank, rope_dim=args.rope_dim, nope_dim=args.nope_dim, init=args.init,
                     seed=args.seed, dtype=args.dtype, drop_qk_norm=args.drop_qk_norm, force=args.force,
                     rope_select=args.rope_select, conv_init=args.conv_init, gate_init=args.gate_init)
    types = report["mixer_types"]
    print(f"wrote {args.out}: {types.count('mla')} MLA, {types.count('mamba2')} Mamba2, "
          f"{types.count('attention')} attention layers (init {args.init}, {report['seconds']}s)")
    for i, e in report["svd_error"].items():
        q = f", W_Q rank-{report['flags']['q_rank']} error {e['q']:.4f}" if report["flags"]["q_rank"] else ""
        print(f"  layer {i}: [W_K, W_V] rank-{report['flags']['kv_rank']} relative error {e['kv']:.4f}{q}")
    print(report["kv_message"])
    return 0
