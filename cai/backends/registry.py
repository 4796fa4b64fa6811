"""Backends by name. Each entry is `module:Class`, imported when first asked for; a new backend is
one module and one line here.

A backend class declares, beside the Backend protocol (cai/backends/base.py):
- `about`: a few words for `--backend`'s help;
- `Settings`: a dataclass of its own options, each declared with `cai.declare.option` (they join
  every command's options: `cai.options.BackendSpec` is made of them), and a classmethod
  `check_settings(spec)` for what only makes sense together;
- `shares`: optionally, names of other backends' options it takes too (vLLM takes hf's `dtype`);
- `resolve(spec)`: (what it loads or calls, the model name records carry), without loading;
- `from_spec(spec, source, model_name)`: the backend, open.
The module must import its engine lazily: importing it for its Settings must stay cheap."""

from __future__ import annotations

import importlib

BACKENDS = {
    "hf": "cai.backends.hf:HFBackend",
    "openai": "cai.backends.openai:OpenAIBackend",
    "vllm": "cai.backends.vllm:VLLMBackend",
    "scripted": "cai.backends.scripted:ScriptedBackend",
}


def names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def backend_class(name: str) -> type:
    """The class registered as `name` (KeyError if none is)."""
    module, _, attribute = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def settings() -> dict[str, type]:
    """Backend name → its Settings dataclass, in the registry's order."""
    return {name: backend_class(name).Settings for name in BACKENDS}


def owners() -> dict[str, tuple[str, ...]]:
    """Option name → the backends whose Settings declare it."""
    import dataclasses

    found: dict[str, list[str]] = {}
    for name, cls in settings().items():
        for f in dataclasses.fields(cls):
            found.setdefault(f.name, []).append(name)
    for name in BACKENDS:
        for shared in getattr(backend_class(name), "shares", ()):
            found.setdefault(shared, []).append(name)
    return {option: tuple(backends) for option, backends in found.items()}


def described() -> str:
    """`--backend`'s help: each backend's name and what it is."""
    return "; ".join(f"{name}: {backend_class(name).about}" for name in BACKENDS) + "."
