"""Model sizes and training recipes, read from the JSON files shipped with the package.

`configuration/sizes/<name>.json` holds EBTConfig fields; `configuration/recipes/<name>.json` holds a recipe:
`model` (EBTConfig fields), `training` (TrainingArguments fields), and optionally `size` and `description`.
Source checkout or installed package: `importlib.resources.files("modeling_ebt.configuration")`.
"""

import json
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold one object, with an error naming the file."""
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{what} must be a JSON object")
    return loaded


def _presets(kind: str) -> dict[str, dict[str, Any]]:
    folder = files("modeling_ebt.configuration") / kind
    return {entry.name.removesuffix(".json"): json.loads(entry.read_text(encoding="utf-8"))
            for entry in sorted(folder.iterdir(), key=lambda e: e.name) if entry.name.endswith(".json")}


@cache
def _sizes() -> dict[str, dict[str, Any]]:
    return _presets("sizes")


@cache
def _recipes() -> dict[str, dict[str, Any]]:
    return _presets("recipes")


def size_names() -> list[str]:
    """The shipped sizes, smallest first."""
    return sorted(_sizes(), key=lambda name: (_sizes()[name]["hidden_size"], _sizes()[name]["num_hidden_layers"]))


def recipe_names() -> list[str]:
    return sorted(_recipes())


def size_fields(name: str) -> dict[str, Any]:
    """A copy of the EBTConfig fields of a shipped size (KeyError for an unknown name)."""
    return dict(_sizes()[name])


def recipe(name: str) -> dict[str, Any]:
    """A deep copy of a shipped recipe (KeyError for an unknown name)."""
    return json.loads(json.dumps(_recipes()[name]))
