"""Zebra: turn a pre-trained Llama-family Transformer into an MLA + Mamba2 hybrid (Zebra-Llama, arXiv 2505.17272).

`import zebra` registers ZebraConfig / ZebraForCausalLM with transformers' Auto classes, so a saved student
loads with `AutoModelForCausalLM.from_pretrained(dir)`. Importing stays cheap: no GPU kernels, no assets.
"""

from .config import ZebraConfig
from .model.hybrid import ZebraForCausalLM, ZebraModel

__version__ = "0.1.0"


def _register() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register("zebra", ZebraConfig, exist_ok=True)
    AutoModel.register(ZebraConfig, ZebraModel, exist_ok=True)
    AutoModelForCausalLM.register(ZebraConfig, ZebraForCausalLM, exist_ok=True)


_register()

__all__ = ["ZebraConfig", "ZebraForCausalLM", "ZebraModel", "__version__"]
