"""What makes two runs the same run: the fingerprint every record carries in its meta, and how
an output's records differ from the run about to continue it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cai import reasoning as thinking

if TYPE_CHECKING:
    from cai.pipeline import RunConfig

FINGERPRINT_KEYS = ("model", "constitution", "templates", "seed", "params")
# Run parameters added after records were first written, with the value that makes the same
# records as before: a file written without one continues under that value.
LATER_PARAMS = {"reasoning": "auto", "reasoning_tags": ",".join(thinking.DEFAULT_TAGS), "repairs": 0,
                "repair_from": "revision", "filters": "on", "feedback": None, "critique": True, "keep_rounds": False}


def run_fingerprint(model_name: str, constitution, templates, config: "RunConfig") -> dict:
    """What makes two runs the same run: records may only be appended to a file whose records
    carry the same fingerprint (it is part of every record's meta, under FINGERPRINT_KEYS)."""
    params = {**config.params.to_dict(), "revisions": config.revisions, "sampling": config.sampling,
              "few_shot": config.few_shot}
    later = {"reasoning": config.reasoning, "reasoning_tags": ",".join(config.reasoning_tags),
             "repairs": config.repairs, "repair_from": config.repair_from, "filters": config.filters,
             "feedback": config.feedback, "critique": config.critique, "keep_rounds": config.keep_rounds}
    params.update({k: v for k, v in later.items() if v != LATER_PARAMS[k]})   # the defaults change no record
    return dict(zip(FINGERPRINT_KEYS, (model_name, constitution.ref, templates.ref, config.seed, params), strict=True))


def fingerprint_differences(record: dict, fingerprint: dict) -> list[str]:
    """How the run that wrote `record` differs from `fingerprint` ('model: a → b', …)."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    found = []
    for key, value in fingerprint.items():
        if key == "params":
            old = meta.get("params") if isinstance(meta.get("params"), dict) else {}
            old, new = {**LATER_PARAMS, **old}, {**LATER_PARAMS, **value}
            found += [f"{k}: {old.get(k)!r} → {v!r}" for k, v in new.items() if old.get(k) != v]
        elif meta.get(key) != value:
            found.append(f"{key}: {meta.get(key)!r} → {value!r}")
    return found
