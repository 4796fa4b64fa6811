"""The one place a backend is opened from options: a BackendSpec names the model and how to
reach it; `resolve` says what will be loaded and the name records carry, `open_backend` loads it.
Which class does it is the registry's answer (cai/backends/registry.py)."""

from __future__ import annotations

import os

from cai.backends.registry import backend_class
from cai.options import BackendSpec


def is_open_backend(model) -> bool:
    """Whether `model` is a backend already open (the Python API's `model=`) rather than a name
    or path; its caller keeps it open and closes it."""
    return model is not None and not isinstance(model, (str, os.PathLike))


def resolve(spec: BackendSpec) -> tuple:
    """(what the backend loads or calls, the model name records carry), without loading any
    weights (a local model or the embedded one is found, its GGUF file converted once)."""
    return backend_class(spec.backend).resolve(spec)


def open_backend(spec: BackendSpec, resolved: tuple | None = None):
    """The backend `spec` names, loaded (a local model) or connected and checked (a server)."""
    spec.check()
    source, model_name = resolved or resolve(spec)
    return backend_class(spec.backend).from_spec(spec, source, model_name)
