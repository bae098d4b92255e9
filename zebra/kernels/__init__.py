"""GPU kernels, imported lazily by zebra.ops.dispatch (never on a CPU-only path); each registers itself
into dispatch._KERNELS under the op name it replaces. Needs the optional extra: pip install 'zebra[cuda]'.

    ssd_scan        fla-core's chunk_simple_gla (pure Triton): Mamba2's SSD as gated linear attention
    causal_conv1d   fla-core's Triton causal conv1d (varlen for packed documents)
"""

from ..ops import dispatch
from . import fla_ops

dispatch._KERNELS.update(fla_ops.KERNELS)
