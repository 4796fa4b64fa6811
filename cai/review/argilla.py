"""`cai export --to argilla DIR`: the pairs as an Argilla 2.x ranking dataset, in the folder
layout `rg.Dataset.to_disk` writes and `rg.Dataset.from_disk` reads (cai does not need the
argilla package to write it; argilla needs nothing of cai to load it):

DIR/.argilla/settings.json   rg.Settings: the prompt as a chat field, the two responses as text
                             fields (response1 the chosen side, response2 the rejected one, as in
                             Argilla's Settings.for_ranking), the last critique, and one ranking
                             question; metadata to filter by (principle, judge, edit size, review)
DIR/.argilla/dataset.json    the dataset's model (name, guidelines, distribution)
DIR/records.json             the records: fields, metadata, and the judge's verdict as a
                             suggestion of the ranking question (its score: the judge's
                             probability that the side it ranks first is the better one)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

FIELDS = ("prompt", "response1", "response2", "critique")
GUIDELINES = (
    "Each record is a preference pair made with Constitutional AI: a model answered the prompt "
    "(its first answer), critiqued it against a principle and revised it. response1 is the side "
    "the data calls chosen (usually the revision), response2 the rejected one (usually the first "
    "answer). Rank the two responses: the better one first. The suggestion, where there is one, "
    "is the AI judge's verdict, scored by its probability.")


def _field(name: str, kind: str, title: str, required: bool = True) -> dict:
    return {"id": None, "inserted_at": None, "updated_at": None, "name": name,
            "settings": {"type": kind, "use_markdown": False}, "title": title, "required": required,
            "description": None, "dataset_id": None, "type": kind}


def _metadata(name: str, kind: str, title: str) -> dict:
    settings = {"visible_for_annotators": True, "type": kind}
    settings.update({"values": None} if kind == "terms" else {"min": None, "max": None})
    return {"id": None, "inserted_at": None, "updated_at": None, "name": name, "settings": settings,
            "title": title, "visible_for_annotators": True, "dataset_id": None}


def settings() -> dict:
    """rg.Settings.serialize() of the dataset (what Settings.to_json writes)."""
    return {
        "guidelines": GUIDELINES,
        "questions": [{"id": None, "inserted_at": None, "updated_at": None, "name": "ranking",
                       "settings": {"type": "ranking", "options": [{"text": "response1 (chosen)", "value": "response1"},
                                                                   {"text": "response2 (rejected)", "value": "response2"}]},
                       "title": "Which response is better? Rank it first.", "description": None, "required": True,
                       "dataset_id": None, "type": "ranking"}],
        "fields": [_field("prompt", "chat", "prompt"), _field("response1", "text", "response1 (chosen)"),
                   _field("response2", "text", "response2 (rejected)"),
                   _field("critique", "text", "the model's critique (last round)", required=False)],
        "vectors": [],
        "metadata": [_metadata("principle", "terms", "principle"), _metadata("judge_preference", "float", "judge: P(chosen better)"),
                     _metadata("judge_agree", "terms", "judge: both orders agree"),
                     _metadata("edit_distance", "float", "edit size (0-1)"), _metadata("review", "terms", "cai review decision")],
        "allow_extra_metadata": False,
        "distribution": {"strategy": "overlap", "min_submitted": 1},
        "mapping": {"chosen": "response1", "rejected": "response2"},
    }


def dataset_model(name: str) -> dict:
    """DatasetModel.model_dump() (what Dataset.to_disk writes to dataset.json); the workspace is
    chosen when it is loaded."""
    return {"id": None, "inserted_at": None, "updated_at": None, "name": name, "status": "draft",
            "guidelines": GUIDELINES, "allow_extra_metadata": False,
            "distribution": {"strategy": "overlap", "min_submitted": 1}, "workspace_id": None, "last_activity_at": None}


def record(pair: dict) -> dict:
    """One cai record as an Argilla record dict (Record.to_dict)."""
    from cai.messages import text_of
    from cai.records import to_format

    messages = to_format(pair, "conversational")["prompt"]
    fields = {"prompt": [{"role": m["role"], "content": m["content"]} for m in messages],
              "response1": text_of(pair["chosen"]), "response2": text_of(pair["rejected"])}
    if isinstance(pair.get("critique"), str) and pair["critique"].strip():
        fields["critique"] = pair["critique"]
    meta = pair.get("meta") if isinstance(pair.get("meta"), dict) else {}
    metadata: dict = {}
    if isinstance(pair.get("principle"), str):
        metadata["principle"] = pair["principle"]
    edit = meta.get("edit")
    if isinstance(edit, dict) and isinstance(edit.get("distance"), (int, float)):
        metadata["edit_distance"] = float(edit["distance"])
    review = meta.get("review")
    if isinstance(review, dict) and isinstance(review.get("decision"), str):
        metadata["review"] = review["decision"]
    suggestions = {}
    judge = pair.get("judge")
    if isinstance(judge, dict) and isinstance(judge.get("preference"), (int, float)):
        # preference is P(revision better); the chosen side is the original where it was swapped
        chosen = 1 - judge["preference"] if judge.get("swapped") else judge["preference"]
        metadata["judge_preference"] = round(float(chosen), 6)
        if isinstance(judge.get("agree"), bool):
            metadata["judge_agree"] = "yes" if judge["agree"] else "no"
        first = ["response1", "response2"] if chosen >= 0.5 else ["response2", "response1"]
        suggestions["ranking"] = {"value": first, "score": round(max(chosen, 1 - chosen), 6),
                                  "agent": str(judge.get("model") or "judge")}
    return {"id": str(pair["id"]), "fields": fields, "metadata": metadata, "suggestions": suggestions,
            "responses": {}, "vectors": {}, "status": "pending", "_server_id": None}


def dataset_name(pairs: str) -> str:
    """A dataset name Argilla accepts (letters, digits, - and _), from the pairs file's name."""
    stem = Path(pairs).name.split(".")[0] or "pairs"
    return "cai-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-_") or "pairs")


def write(folder: Path, pairs: str, records: list[dict]) -> list[str]:
    """Write the dataset into `folder` (which exists); the files written, relative to it."""
    from cai.output import write_whole

    rows = [record(r) for r in records]     # every row made before any file is written
    (folder / ".argilla").mkdir(exist_ok=True)
    files = {".argilla/settings.json": settings(), ".argilla/dataset.json": dataset_model(dataset_name(pairs)),
             "records.json": rows}
    for relative, data in files.items():
        write_whole(str(folder / relative), (json.dumps(data, ensure_ascii=False, indent=1 if relative != "records.json" else None)
                                             + "\n").encode("utf-8"))
    readme = (f"# {dataset_name(pairs)}\n\nPreference pairs from `{Path(pairs).name}`, written by `cai export --to argilla` "
              "as an Argilla 2.x ranking dataset (the layout of `rg.Dataset.to_disk`).\n\n"
              "```python\nimport argilla as rg\n\nclient = rg.Argilla(api_url=\"http://localhost:6900\", api_key=\"…\")\n"
              f"dataset = rg.Dataset.from_disk(\"{folder}\", client=client)\n```\n\n"
              "response1 is the chosen side, response2 the rejected one; the ranking question's suggestion is the "
              "AI judge's verdict where the pairs were judged.\n")
    write_whole(str(folder / "README.md"), readme.encode("utf-8"))
    return [*files, "README.md"]
