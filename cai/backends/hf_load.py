"""Why a local model did not load, in one line: the exceptions transformers and safetensors raise
while loading, turned into ModelError."""

from __future__ import annotations

from cai.errors import ModelError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line if len(line) <= 200 else line[:199] + "…"


def _corrupt_weights(source: str) -> list[str]:
    """The safetensors files of a local model folder whose header does not read (truncated, cut, garbage)."""
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    folder = Path(source)
    bad = []
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            bad.append(path.name)
    return bad


def load_error(exc: Exception, source: str, model_name: str) -> ModelError | None:
    """The one-line ModelError for what loading a model raised, or None for an exception that is
    no loading problem (a bug: it keeps its traceback). A weights file that is truncated or corrupt
    raises safetensors' SafetensorError ("Error while deserializing header: …"); tensors whose
    shapes do not fit config.json, and running out of memory, raise RuntimeError."""
    from safetensors import SafetensorError

    where = f"cannot load model '{model_name}'"
    reason = _first_line(exc)
    if isinstance(exc, SafetensorError):
        bad = _corrupt_weights(source)
        files = ", ".join(bad) if bad else "a safetensors weights file"
        reason = reason.removeprefix("Error while ").strip()
        return ModelError(f"{where}: {files} {'is' if len(bad) <= 1 else 'are'} truncated or corrupt: {reason}")
    if isinstance(exc, RuntimeError):
        if "mismatched_sizes" in reason or "size mismatch" in str(exc):
            reason = "the shapes of its weights do not fit its config.json (a corrupt or mismatched checkpoint)"
        return ModelError(f"{where}: {reason}")
    if isinstance(exc, (OSError, ValueError)):
        if "pickle" in reason.lower() or ".bin" in reason or "safetensors" in reason.lower():
            reason += " (cai loads safetensors weights only; `allow_pickle` loads pickle checkpoints you trust)"
        return ModelError(f"{where}: {reason}")
    return None


def detach_from_files(model) -> None:
    """Copies the parameters and buffers still backed by the weights file into the process's own
    memory. transformers may leave a CPU model's tensors as views of the memory-mapped
    safetensors file; once the linear layers are repacked (cai.backends.quant) only a few of them
    (the embeddings, the norms) remain, but each view keeps the whole mapping, every page of it
    read once during loading, resident: about 500 MB for SmolLM2-135M. A copy of those few
    tensors lets the mapping go."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            for _, parameter in module.named_parameters(recurse=False):
                parameter.data = parameter.data.clone()
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None:
                    module._buffers[name] = buffer.clone()
