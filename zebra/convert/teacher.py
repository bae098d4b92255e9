"""Load a teacher (base model) for conversion: its HF config dict, a float32 CPU state dict, and its tokenizer
(SPEC 1 step 1, 3). Also the config alone, for `zebra kv`.

    config, state, tokenizer = load_teacher("path/to/hf_dir")   # config.json + *.safetensors / *.bin (sharded ok)
    config, state, tokenizer = load_teacher("model.Q8_0.gguf")  # dequantised by transformers' GGUF reader
    config, state, tokenizer = load_teacher("smollm2-135m-instruct")  # the embedded offline teacher
    config = load_teacher_config("llama-3.2-1b")                # a shipped shape (zebra/shapes/*.json)

An HF directory is read directly with safetensors / torch.load, not through from_pretrained, so the raw
config.json is what we map (no version-dependent rewriting) and a corrupt file is named in the error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import ZebraError

SHAPES_DIR = Path(__file__).resolve().parent.parent / "shapes"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def shape_names() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZebraError(f"cannot read {path}: {e}") from None


def _resolve_embedded(name: str) -> Path:
    """Local HF dir of an embedded teacher name (zebra.assets, imported only when needed)."""
    try:
        from .. import assets
    except ImportError as e:
        raise ZebraError(f"teacher '{name}' is not a path, and the embedded assets are unavailable ({e})") from None
    try:
        return Path(assets.resolve_teacher(name))
    except ZebraError as e:
        raise ZebraError(f"teacher '{name}' is not an existing path or an embedded teacher: {e}") from None
    except (KeyError, ValueError) as e:
        raise ZebraError(f"teacher '{name}' is not an existing path or an embedded teacher ({e})") from None


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~"))


# ---- config only ---------------------------------------------------------------------------------------------
def load_teacher_config(spec: str) -> dict:
    """HF config dict from a config.json file, a directory holding one, a .gguf file, a shipped shape name
    (llama-3.2-1b, llama-3.2-3b, llama-3.1-8b), the embedded teacher name, or a hub id (online only)."""
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return _auto_config(str(p.parent), gguf_file=p.name)
    if p.is_file():
        return _read_json(p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ZebraError(f"{p} has no config.json")
        return _read_json(p / "config.json")
    if p.exists():
        raise ZebraError(f"{p} is neither a file nor a directory")
    if spec in shape_names():
        return _read_json(SHAPES_DIR / f"{spec}.json")
    if _is_hub_id(spec):
        return _auto_config(spec)
    if "/" in spec or p.suffix in (".json", ".gguf"):
        raise ZebraError(f"teacher path {spec} does not exist")
    return load_teacher_config(str(_resolve_embedded(spec)))


def _auto_config(name: str, **kw) -> dict:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, **kw).to_dict()
    except Exception as e:  # noqa: BLE001  (hub / parser errors come in many types; all mean "cannot load")
        if "gguf_file" in kw:
            raise ZebraError(f"cannot read the config of {name}/{kw['gguf_file']} ({_first_line(e)})") from None
        raise ZebraError(f"teacher '{name}' is not a local path, and loading it as a Hugging Face hub id failed "
                         f"({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    """Library errors often run to several lines of advice; the first says what went wrong."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


# ---- weights -------------------------------------------------------------------------------------------------
def load_teacher(name_or_path: str):
    """(config dict, state dict of float32 CPU tensors with HF Llama names, tokenizer or None)."""
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return _load_gguf(p)
    if p.is_dir():
        return _load_hf_dir(p)
    if p.exists():
        raise ZebraError(f"teacher {p} is neither a model directory nor a .gguf file")
    if _is_hub_id(name_or_path):
        return _load_with_transformers(name_or_path)
    if "/" in name_or_path or p.suffix in (".gguf", ".json", ".safetensors"):
        raise ZebraError(f"teacher path {name_or_path} does not exist")
    return _load_hf_dir(_resolve_embedded(name_or_path))


def _weight_files(d: Path) -> list[Path]:
    """Weight files of an HF dir: the sharded index's files, else the single-file checkpoint, else any shards."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.is_file():
            files = sorted(set(_read_json(index).get("weight_map", {}).values()))
            missing = [f for f in files if not (d / f).is_file()]
            if missing:
                raise ZebraError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
            return [d / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            return [d / single]
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    if not files:
        raise ZebraError(f"{d} has a config.json but no weights (*.safetensors or pytorch_model*.bin)")
    return files


def _read_weight_file(f: Path) -> dict[str, torch.Tensor]:
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(f), device="cpu")
        return torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types, torch.load several)
        raise ZebraError(f"cannot read weights from {f}: the file is corrupt or truncated "
                         f"({type(e).__name__}: {e})") from None


def _normalise_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 CPU tensors named like LlamaForCausalLM (a checkpoint of the bare LlamaModel lacks 'model.')."""
    out = {}
    for k, v in state.items():
        if not k.startswith(("model.", "lm_head.")):
            k = "model." + k
        out[k] = v.to(dtype=torch.float32) if v.is_floating_point() else v
    return out


def _load_tokenizer(path: str, **kw):
    """The teacher's tokenizer, or None when it has none (the student is still usable with an external one)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kw)
    except Exception:  # noqa: BLE001  (no tokenizer files: not an error for conversion)
        return None


def _load_hf_dir(d: Path):
    if not d.is_dir():
        raise ZebraError(f"teacher directory {d} does not exist")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ZebraError(f"{d} has no config.json (expected a Hugging Face model directory)")
    config = _read_json(cfg_path)
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(d):
        state.update(_read_weight_file(f))
    has_tokenizer = any((d / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tokenizer = _load_tokenizer(str(d)) if has_tokenizer else None
    return config, _normalise_names(state), tokenizer


def _load_gguf(f: Path):
    return _load_with_transformers(str(f.parent), gguf_file=f.name)


def _load_with_transformers(name: str, **kw):
    """GGUF files and hub ids go through from_pretrained (GGUF is dequantised to float32 there)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kw)
    except Exception as e:  # noqa: BLE001  (offline, unknown id, bad GGUF: all "cannot load this teacher")
        if "gguf_file" in kw:
            raise ZebraError(f"cannot load the GGUF teacher {name}/{kw['gguf_file']} ({_first_line(e)})") from None
        raise ZebraError(f"teacher '{name}' is not a local path, and loading it as a Hugging Face hub id failed "
                         f"({_first_line(e)})") from None
    config = model.config.to_dict()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return config, _normalise_names(state), _load_tokenizer(name, **kw)


def load_generation_config(name_or_path: str):
    """The teacher's GenerationConfig when it is a local HF dir (or the embedded teacher) that has one, else None."""
    p = Path(name_or_path).expanduser()
    if not p.exists() and "/" not in name_or_path and p.suffix == "":
        try:
            p = _resolve_embedded(name_or_path)
        except ZebraError:
            return None
    if not (p.is_dir() and (p / "generation_config.json").is_file()):
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(p))
    except Exception:  # noqa: BLE001  (a broken generation config should not block conversion)
        return None
