"""Write docs/bundle.md from the bundle schema in ``mcc_serve.runtime.bundle``, or check that it is up to date.

    python scripts/bundle_doc.py            # (re)write docs/bundle.md
    python scripts/bundle_doc.py --check    # exit 1 if docs/bundle.md differs from what the schema gives

The page is a table of the bundle's files (``FILES``, in write order), then one table per pydantic model of
model.json, starting at ``ModelJson`` and following its nested models: field, type, required or default,
description (the ``Field`` description plus its constraints). Imports only the torch-free schema module.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import types
import typing
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "bundle.md"
sys.path.insert(0, str(ROOT))

from mcc_serve.runtime import bundle  # noqa: E402

# JSON-schema keywords of a field's constraints, as the page writes them
CONSTRAINTS = {
    "minimum": ">= {}",
    "exclusiveMinimum": "> {}",
    "maximum": "<= {}",
    "exclusiveMaximum": "< {}",
    "pattern": "matches `{}`",
}
SIZES = {"Length": "characters", "Items": "items"}  # minLength/maxLength, minItems/maxItems


def cell(text: str) -> str:
    """``text`` fit for one markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def type_name(annotation: typing.Any) -> str:
    """A field's type as the page writes it: JSON names, literals quoted, nested models linked."""
    if annotation is type(None):
        return "null"
    if annotation is typing.Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{anchor(annotation)})"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " or ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        return f"dict[{type_name(args[0])}, {type_name(args[1])}]" if args else "dict"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "dict"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def nested_models(annotation: typing.Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in nested_models(a)]


def models_of(root: type[BaseModel]) -> list[type[BaseModel]]:
    """``root`` and every model its fields nest, breadth first, each once."""
    order, queue = [], [root]
    while queue:
        model = queue.pop(0)
        if model in order:
            continue
        order.append(model)
        for field in model.model_fields.values():
            queue += nested_models(field.annotation)
    return order


def default_of(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "its defaults"
    return f"`{json.dumps(value)}`"


def constraints_of(prop: dict) -> list[str]:
    """The constraints of a field's JSON schema (and of each branch of an ``anyOf``), in words."""
    found = [text.format(prop[key]) for key, text in CONSTRAINTS.items() if key in prop]
    for suffix, unit in SIZES.items():
        lo, hi = prop.get(f"min{suffix}"), prop.get(f"max{suffix}")
        if lo is not None and lo == hi:
            found.append(f"exactly {lo} {unit}")
        elif lo == 1 and hi is None:
            found.append("not empty")
        else:
            found += [f"{word} {n} {unit}" for word, n in (("at least", lo), ("at most", hi)) if n is not None]
    for branch in prop.get("anyOf", []):
        found += constraints_of(branch)
    return found


def model_table(model: type[BaseModel]) -> list[str]:
    properties = model.model_json_schema()["properties"]
    lines = [f"### {model.__name__}", ""]
    doc = inspect.getdoc(model) if "__doc__" in vars(model) and model.__doc__ else ""
    if doc:
        lines += [" ".join(doc.split()), ""]
    if model.model_config.get("extra") == "allow":
        lines += ["Keys not listed here are kept as they are.", ""]
    lines += ["| field | type | required / default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        prop = properties.get(field.alias or name, {})
        description = "; ".join([field.description or "", *constraints_of(prop)]).strip("; ")
        row = [f"`{name}`", type_name(field.annotation), default_of(field), description]
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return [*lines, ""]


def render() -> str:
    """The whole page."""
    lines = [
        "# Bundle format",
        "",
        "<!-- Generated by scripts/bundle_doc.py from mcc_serve/runtime/bundle.py; edit the schema, not this page. -->",
        "",
        f"A bundle is the directory `mcc-export` writes: format `{bundle.FORMAT}`, version {bundle.VERSION}. "
        "It is written into a temporary directory and renamed into place only after the proof passed. "
        "How it is made and checked: [export.md](export.md).",
        "",
        "## Files",
        "",
        "In the order mcc-export writes them.",
        "",
        "| file | what it holds |",
        "|---|---|",
        *(f"| `{name}` | {cell(what)} |" for name, what in bundle.FILES.items()),
        "",
        "## model.json",
        "",
        "Validated by `ModelJson` on every read (`mcc-export --verify`, `mcc-serve`, `mcc-predict`, `mcc-eval`); "
        "a file that does not validate is refused with one line naming the field.",
        "",
    ]
    for model in models_of(bundle.ModelJson):
        lines += model_table(model)
    return "\n".join(lines).rstrip() + "\n"


def write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from the schema's")
    parser.add_argument("--out", type=Path, default=PAGE, help=f"the page (default: {PAGE.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out}: out of date with the bundle schema; run python scripts/bundle_doc.py", file=sys.stderr)
            return 1
        return 0
    write(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
