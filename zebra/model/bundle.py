"""Checkpoints that stand alone: the model's own source, bundled beside the weights, so that

    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)      # no `import zebra` needed
    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True

load a saved student where zebra is not installed, with the same logits (transformers' remote-code mechanism:
`auto_map` in config.json names the classes in the files below).

    configuration_zebra.py   zebra/config.py as is
    modeling_zebra.py        the model: ops/conv.py, ops/ssd.py (the pure-PyTorch reference ops), model/common.py,
                             cache.py, attention.py, mla.py, mamba2.py, hybrid.py, concatenated in that order

The files are generated from the package's own modules at save time (one definition of every equation: the
bundle is a copy, never edited): relative imports are dropped (everything is in one module), the kernel dispatch
becomes the reference ops, and what needs the package (the static-cache CUDA-graph engine) raises ImportError
saying so. `write_bundle(dir)` writes them and returns the auto_map for config.json.
"""

from __future__ import annotations

import re
from pathlib import Path

_PKG = Path(__file__).resolve().parents[1]
CONFIG_FILE = "configuration_zebra.py"
MODELING_FILE = "modeling_zebra.py"
_MODEL_SOURCES = ["ops/conv.py", "ops/ssd.py", "model/common.py", "model/cache.py", "model/attention.py",
                  "model/mla.py", "model/mamba2.py", "model/hybrid.py"]
AUTO_MAP = {"AutoConfig": "configuration_zebra.ZebraConfig",
            "AutoModel": "modeling_zebra.ZebraModel",
            "AutoModelForCausalLM": "modeling_zebra.ZebraForCausalLM"}

_HEADER = '''"""Zebra hybrid (MLA + Mamba2) model, bundled with a checkpoint by the zebra package ({what}).

Generated from zebra's own modules (do not edit; `pip install zebra` for the GPU kernels and the tools).
Load with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True).
"""

from __future__ import annotations
'''

_DISPATCH = '''

class dispatch:  # noqa: N801  (the bundle's stand-in for zebra.ops.dispatch: the pure-PyTorch reference ops)
    @staticmethod
    def causal_conv1d(x, weight, bias, state=None, doc_ids=None, backend=None):
        return causal_conv1d(x, weight, bias, state, doc_ids=doc_ids)

    @staticmethod
    def ssd_scan(x, dt, A, Bm, Cm, initial_state=None, chunk_size=64, doc_ids=None, backend=None):
        return ssd_chunked(x, dt, A, Bm, Cm, initial_state=initial_state, chunk_size=chunk_size, doc_ids=doc_ids)

    @staticmethod
    def ssd_step(state, x, dt, A, Bm, Cm, backend=None):
        return ssd_step(state, x, dt, A, Bm, Cm)

'''

_TOP_RELATIVE = re.compile(r"^from \.+[\w.]* import .*$")
_LAZY_RELATIVE = re.compile(r"^(\s+)from \.+[\w.]* import .*$")


def _strip(source: str, drop_docstring: bool = True) -> str:
    """A module's source without `from __future__`, its module docstring and its relative imports; a relative
    import inside a function (something only the full package has) becomes an ImportError that says so."""
    if drop_docstring:
        m = re.match(r'\s*(""".*?""")', source, re.S)
        if m:
            source = source[m.end():]
    out = []
    for line in source.splitlines():
        if line.startswith("from __future__"):
            continue
        if _TOP_RELATIVE.match(line):
            continue
        lazy = _LAZY_RELATIVE.match(line)
        if lazy:
            out.append(f'{lazy.group(1)}raise ImportError("this needs the zebra package (pip install zebra): '
                       f'{line.strip()}")')
            continue
        out.append(line)
    return "\n".join(out).strip("\n") + "\n"


def config_source() -> str:
    return _HEADER.format(what="configuration") + "\n" + _strip((_PKG / "config.py").read_text())


def modeling_source() -> str:
    parts = [_HEADER.format(what="modeling"), "from .configuration_zebra import ZebraConfig  # noqa: F401\n"]
    for rel in _MODEL_SOURCES:
        parts.append(f"\n# ---- zebra/{rel} " + "-" * (100 - 13 - len(rel)) + "\n")
        parts.append(_strip((_PKG / rel).read_text()))
        if rel == "ops/ssd.py":
            parts.append(_DISPATCH)
    return "\n".join(parts)


def write_bundle(directory: str | Path) -> dict:
    """Write configuration_zebra.py and modeling_zebra.py into `directory`; returns the auto_map for config.json."""
    d = Path(directory)
    (d / CONFIG_FILE).write_text(config_source())
    (d / MODELING_FILE).write_text(modeling_source())
    return dict(AUTO_MAP)
