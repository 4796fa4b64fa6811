"""The constitution: a YAML list of principles, loaded into typed objects and validated with
file:line:column for every problem. Pure Python (no torch), so validation answers at once.

  model.py     the dataclasses (Principle, FewShot, Defaults, Constitution)
  schema.py    the field specs of the format and the JSON Schema built from them
  validate.py  the YAML checker: parse_constitution
  lookup.py    shipped constitutions, resolving a name or path, loading, the starter file
  sampling.py  which principles each record gets (plan_principles, SAMPLING_MODES)

The shipped YAML files live in the `constitutions/` folder, installed as `cai.constitutions`."""

from __future__ import annotations

from cai.constitution.lookup import (load_constitution, resolve_constitution_path, shipped_constitutions,
                                     starter_text)
from cai.constitution.model import Constitution, Defaults, FewShot, Principle
from cai.constitution.sampling import SAMPLING_MODES, plan_principles
from cai.constitution.schema import SLUG, json_schema
from cai.constitution.validate import Problem, parse_constitution
from cai.shipped import data_dir

__all__ = ["SAMPLING_MODES", "SLUG", "Constitution", "Defaults", "FewShot", "Principle", "Problem", "data_dir",
           "json_schema", "load_constitution", "parse_constitution", "plan_principles",
           "resolve_constitution_path", "shipped_constitutions", "starter_text"]
