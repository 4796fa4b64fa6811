"""cai: constitutional-AI preference data (generate → critique → revise) as a Unix tool, and as a
Python library: `cai.generate(prompts, output)` runs what `cai generate` runs.

Names are imported when first used, so `import cai` (and `cai --help`) stays fast."""

__version__ = "0.1.0"

__all__ = [
    "generate", "judge", "merge", "export", "compare", "load_constitution",
    "GenerateOptions", "JudgeOptions", "BackendSpec", "Summary", "JudgeSummary", "MergeSummary",
    "Pipeline", "RunConfig", "SamplingParams", "open_backend", "StopSignals",
    "CaiError", "UsageError", "OptionError", "InputError", "ConstitutionError", "ModelError", "BackendError",
    "OutputError", "__version__",
]

_HOMES = {
    "generate": "cai.api", "judge": "cai.api", "merge": "cai.api", "export": "cai.api", "compare": "cai.api",
    "load_constitution": "cai.api",
    "GenerateOptions": "cai.options", "JudgeOptions": "cai.options", "BackendSpec": "cai.options",
    "Summary": "cai.run.summary", "JudgeSummary": "cai.run.judge", "MergeSummary": "cai.run.merge",
    "Pipeline": "cai.pipeline", "RunConfig": "cai.pipeline", "SamplingParams": "cai.backends.base",
    "open_backend": "cai.backends.spec", "StopSignals": "cai.signals",
    **{name: "cai.errors" for name in ("CaiError", "UsageError", "OptionError", "InputError", "ConstitutionError",
                                       "ModelError", "BackendError", "OutputError")},
}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cai' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
