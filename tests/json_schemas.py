"""Varied JSON schemas for structured-output tests and benchmarks."""
from __future__ import annotations

import random


def varied_schemas(count: int, seed: int = 0) -> list[dict]:
    """Nested objects, arrays with min/max items, enums, integer and number bounds, string
    patterns and lengths, required and optional properties, anyOf."""
    rng = random.Random(seed)

    def leaf(depth):
        kind = rng.choice(["int", "num", "enum", "str", "pattern", "bool", "array", "object",
                           "anyof"] if depth < 2 else ["int", "num", "enum", "str", "bool"])
        if kind == "int":
            low = rng.randint(-50, 50)
            return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
        if kind == "num":
            return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000])}
        if kind == "enum":
            return {"enum": rng.sample(["red", "green", "blue", "cyan", 1, 2, True], 3)}
        if kind == "str":
            low = rng.randint(1, 5)
            return {"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 10)}
        if kind == "pattern":
            return {"type": "string", "pattern": rng.choice(["^[A-Z]{3}-[0-9]{2}$",
                                                             "^[a-z]+@[a-z]+\\.com$"])}
        if kind == "bool":
            return {"type": "boolean"}
        if kind == "array":
            low = rng.randint(0, 2)
            return {"type": "array", "items": leaf(depth + 1), "minItems": low,
                    "maxItems": low + rng.randint(1, 3)}
        if kind == "anyof":
            return {"anyOf": [leaf(depth + 1), leaf(depth + 1)]}
        return obj(depth + 1)

    def obj(depth):
        names = rng.sample(["id", "name", "age", "score", "tags", "city", "ok", "kind"],
                           rng.randint(1, 4))
        properties = {n: leaf(depth) for n in names}
        return {"type": "object", "properties": properties,
                "required": rng.sample(names, rng.randint(1, len(names))),
                "additionalProperties": False}

    return [obj(0) for _ in range(count)]
