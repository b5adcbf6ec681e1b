"""``/docs/api``: the API reference page, rendered on the server from the OpenAPI document that
``/openapi.json`` serves (:func:`cdc.web.openapi.openapi_document`): every operation with its
parameters and responses, then every schema. No script and no external asset: the page is the
document, laid out with the pages' templates and stylesheet."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from cdc.web.base import context_of
from cdc.web.openapi import openapi_document
from cdc.web.page_base import render

__all__ = ["prose", "reference_page", "reference_view"]

#: The order of the operation groups (tags); any other tag follows.
TAG_ORDER = ("History", "Search", "Undo previews", "Operations")

#: A type as text with links: [(text, href or None), ...]
Type = list[tuple[str, str | None]]
#: Prose with the document's inline code (`...`): [(text, is code), ...]
Prose = list[tuple[str, bool]]


def prose(text: str) -> Prose:
    """The document's descriptions mark code with backticks (CommonMark's inline code, nothing more)."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: plain text
        return [(text, False)] if text else []
    return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]


@dataclass
class ParamView:
    name: str
    where: str
    required: bool
    type: Type
    description: Prose
    example: str | None


@dataclass
class ResponseView:
    status: str
    description: Prose
    media: str
    type: Type


@dataclass
class OperationView:
    anchor: str
    method: str
    path: str
    summary: str
    description: Prose
    open: bool
    params: list[ParamView]
    responses: list[ResponseView]


@dataclass
class PropertyView:
    name: str
    required: bool
    type: Type
    description: Prose


@dataclass
class SchemaView:
    name: str
    anchor: str
    description: Prose
    type: Type
    properties: list[PropertyView] = field(default_factory=list)


def _anchor(name: str) -> str:
    return f"schema-{name}"


def type_of(schema: Mapping[str, Any]) -> Type:
    """A JSON schema as short text: ``string (1 to 300 characters)``, ``array of Mutation``..."""
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return [(name, f"#{_anchor(name)}")]
    if "anyOf" in schema:
        out: Type = []
        for i, option in enumerate(schema["anyOf"]):
            if i:
                out.append((" or ", None))
            out.extend(type_of(option))
        return out
    kind = schema.get("type")
    if isinstance(kind, list):
        return _join([type_of({**schema, "type": k}) for k in kind])
    if "enum" in schema:
        values = [str(v) if v != "" else '""' for v in schema["enum"]]
        return [(f"{kind or 'value'}: one of {', '.join(values)}", None)]
    if kind == "array":
        return [("array of ", None), *type_of(schema.get("items") or {})]
    if kind is None:
        return [("any JSON value", None)]
    return [(str(kind) + _bounds(schema), None)]


def _join(parts: list[Type]) -> Type:
    out: Type = []
    for i, part in enumerate(parts):
        if i:
            out.append((" or ", None))
        out.extend(part)
    return out


def _bounds(schema: Mapping[str, Any]) -> str:
    notes = []
    if "format" in schema:
        notes.append(str(schema["format"]))
    low, high = schema.get("minLength"), schema.get("maxLength")
    if high is not None:
        notes.append(f"{low or 0} to {high} characters")
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None or high is not None:
        notes.append(f"{low if low is not None else '…'} to {high if high is not None else '…'}")
    if "pattern" in schema:
        notes.append(f"pattern {schema['pattern']}")
    return f" ({'; '.join(notes)})" if notes else ""


def _operation(path: str, method: str, op: Mapping[str, Any], secured: bool) -> OperationView:
    params = [
        ParamView(
            name=str(p["name"]),
            where=str(p["in"]),
            required=bool(p.get("required")),
            type=type_of(p.get("schema") or {}),
            description=prose(str(p.get("description") or "")),
            example=None if p.get("example") is None else str(p["example"]),
        )
        for p in op.get("parameters") or []
    ]
    responses = []
    for status, response in (op.get("responses") or {}).items():
        content = response.get("content") or {}
        media = next(iter(content), "")
        schema = (content.get(media) or {}).get("schema") or {}
        responses.append(
            ResponseView(str(status), prose(str(response.get("description") or "")), media, type_of(schema))
        )
    return OperationView(
        anchor=str(op.get("operationId") or f"{method}-{path}"),
        method=method.upper(),
        path=path,
        summary=str(op.get("summary") or ""),
        description=prose(str(op.get("description") or "")),
        open=not secured or op.get("security") == [],
        params=params,
        responses=responses,
    )


def _schema(name: str, schema: Mapping[str, Any]) -> SchemaView:
    required = set(schema.get("required") or ())
    properties = [
        PropertyView(
            name=str(prop),
            required=prop in required,
            type=type_of(sub),
            description=prose(str(sub.get("description") or "")),
        )
        for prop, sub in (schema.get("properties") or {}).items()
    ]
    return SchemaView(
        name, _anchor(name), prose(str(schema.get("description") or "")), type_of(schema), properties
    )


def reference_view(document: Mapping[str, Any]) -> dict[str, Any]:
    """The document as the template shows it: operations grouped by tag, then the schemas (whether
    a token is needed: the pages' ``secured``, from the same server)."""
    secured = bool(document.get("security"))
    groups: dict[str, list[OperationView]] = {}
    for path, item in document["paths"].items():
        for method, op in item.items():
            tag = (op.get("tags") or ["Other"])[0]
            groups.setdefault(tag, []).append(_operation(path, method, op, secured))
    order = [t for t in TAG_ORDER if t in groups] + sorted(t for t in groups if t not in TAG_ORDER)
    schemas = document.get("components", {}).get("schemas", {})
    return {
        "info": {**document["info"], "description": prose(str(document["info"].get("description") or ""))},
        "openapi_version": document["openapi"],
        "groups": [(tag, groups[tag]) for tag in order],
        "schemas": [_schema(name, schemas[name]) for name in sorted(schemas)],
    }


async def reference_page(request: Request) -> Response:
    ctx = context_of(request)
    document = ctx.extra.get("openapi")
    if document is None:
        document = ctx.extra["openapi"] = openapi_document(secured=ctx.token is not None)
    return render(request, "reference.html", title="API reference", **reference_view(document))
