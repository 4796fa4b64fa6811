"""The one place a backend is opened from options: a BackendSpec names the model and how to
reach it; `resolve` says what will be loaded and the name records carry, `open_backend` loads it."""

from __future__ import annotations

import os

from cai.options import BackendSpec

DEFAULT_KEY_ENV = "OPENAI_API_KEY"      # read when set; a variable the user names must be set


def is_open_backend(model) -> bool:
    """Whether `model` is a backend already open (the Python API's `model=`) rather than a name
    or path; its caller keeps it open and closes it."""
    return model is not None and not isinstance(model, (str, os.PathLike))


def resolve(spec: BackendSpec) -> tuple[str, str]:
    """(what the backend loads or calls, the model name records carry). Finds a local model or
    the embedded one (converting its GGUF file once) without loading any weights."""
    if spec.backend == "vllm":                  # issue 30: the name says engine and precision
        from cai.backends.vllm import resolve_name
        from cai.models import resolve_model

        source, model_name = resolve_model(spec.model)
        return source, resolve_name(source, model_name, spec.vllm_options())
    if spec.backend != "hf":
        return spec.endpoints(), spec.model
    from cai.backends.hf import weights_name
    from cai.models import resolve_model

    source, model_name = resolve_model(spec.model)
    return source, weights_name(model_name, spec.dtype)


def open_backend(spec: BackendSpec, resolved: tuple[str, str] | None = None):
    """The backend `spec` names, loaded (a local model) or connected and checked (a server)."""
    spec.check()
    source, model_name = resolved or resolve(spec)
    if spec.backend == "openai":
        from cai.backends.openai import OpenAIBackend

        return OpenAIBackend(source, model_name, api_key_env=spec.api_key_env or DEFAULT_KEY_ENV, timeout=spec.timeout,
                             max_retries=spec.max_retries, concurrency=spec.concurrency, allow_down=spec.allow_down)
    if spec.backend == "vllm":
        from cai.backends.vllm import VLLMBackend

        return VLLMBackend(source, model_name, spec.vllm_options())
    from cai.backends.hf import HFBackend, HFOptions

    return HFBackend(source, model_name, HFOptions(
        device=spec.device, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code,
        allow_pickle=spec.allow_pickle, plain_chat_format=spec.plain_chat_format, threads=spec.threads))
