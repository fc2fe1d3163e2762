"""Random JSON schemas for structured-output tests: small, bounded (every string, number and array has
limits), so a greedy small model can finish each within a modest max_tokens."""

from __future__ import annotations

import random
from typing import Any

_WORDS = ["name", "city", "age", "score", "tags", "active", "color", "id", "items", "price", "count", "label"]


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    kinds = ["string", "integer", "number", "boolean", "enum"] + (["array", "object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(3, 12)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": 1000}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", 1, 2, True, None], rng.randint(2, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": 1, "maxItems": rng.randint(1, 3)}
    return random_object(rng, depth + 1)


def random_object(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    keys = rng.sample(_WORDS, rng.randint(1, 3 if depth else 4))
    return {"type": "object", "properties": {key: random_schema(rng, depth) for key in keys},
            "required": keys, "additionalProperties": False}
