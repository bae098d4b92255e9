"""GPU kernels, imported lazily by zebra.ops.dispatch (never on a CPU-only path); each registers itself
through dispatch.register() under the op name it replaces. Needs triton (shipped with CUDA builds of torch);
the training / prefill scan also needs the optional extra: pip install 'zebra[cuda]' (fla-core).

    decode_attention  zebra.kernels.decode: split-K decode attention (GQA, absorbed MLA latent rows)
    mamba2_step       zebra.kernels.decode: the fused Mamba2 decode step
    add_rms_norm, gated_rms_norm, rope, silu_mul   zebra.kernels.fused: the decode step's elementwise work
    ssd_scan          fla-core's chunk_simple_gla (pure Triton): Mamba2's SSD as gated linear attention
    causal_conv1d     fla-core's Triton causal conv1d (varlen for packed documents)
"""

from ..ops import dispatch
from . import decode, fused

dispatch.register(decode.KERNELS)
dispatch.register(fused.KERNELS)
try:
    from . import fla_ops
except ImportError as e:  # decode kernels stay usable; training / prefill use the reference scan
    MISSING_FLA = str(e)
else:
    MISSING_FLA = None
    dispatch.register(fla_ops.KERNELS)
