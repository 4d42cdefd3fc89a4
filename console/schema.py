"""JSON Schemas read by people: a tool's input schema as rows of a table, and as a form.

The admin shows what a tool takes (`schema_rows`: name, type, required, description, nested
properties indented) and the playground builds its form from the same schema (`schema_form`).
Only the parts of JSON Schema that tools use are understood; anything else is shown and
entered as JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from django import forms

MAX_DEPTH = 6
"""Nested properties shown below this depth are summarised as JSON (a hostile schema stays small)."""
MAX_ROWS = 200


@dataclass(frozen=True)
class SchemaRow:
    name: str
    depth: int
    type: str
    required: bool
    description: str
    details: str
    """Enum values, default, bounds: what else the schema says, in words."""


def type_label(schema: Any) -> str:
    """Say what a schema admits: "string", "array of integer", "string | null", "object"."""
    if not isinstance(schema, dict):
        return "any"
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(str(k) for k in kind)
    if kind == "array":
        return f"array of {type_label(schema.get('items'))}"
    if isinstance(kind, str):
        return kind
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return " | ".join(type_label(s) for s in schema[key][:6])
    if "enum" in schema:
        return "enum"
    if "properties" in schema:
        return "object"
    return "any"


def _details(schema: dict[str, Any]) -> str:
    parts = []
    if isinstance(schema.get("enum"), list):
        parts.append("one of " + ", ".join(json.dumps(v) for v in schema["enum"][:20]))
    if "default" in schema:
        parts.append(f"default {json.dumps(schema['default'])}")
    bounds = (("minimum", "min"), ("maximum", "max"), ("minLength", "min length"), ("maxLength", "max length"), ("format", "format"), ("pattern", "pattern"))
    for key, word in bounds:
        if key in schema:
            parts.append(f"{word} {schema[key]}")
    return "; ".join(parts)


def schema_rows(schema: Any) -> list[SchemaRow]:
    """Flatten an object schema's properties (and nested ones) into table rows, depth first."""
    rows: list[SchemaRow] = []

    def walk(node: Any, depth: int) -> None:
        if not isinstance(node, dict) or depth > MAX_DEPTH:
            return
        properties = node.get("properties")
        if not isinstance(properties, dict):
            return
        required = node.get("required") if isinstance(node.get("required"), list) else []
        for name, sub in properties.items():
            if len(rows) >= MAX_ROWS:
                return
            sub = sub if isinstance(sub, dict) else {}
            description = sub.get("description") if isinstance(sub.get("description"), str) else ""
            rows.append(SchemaRow(str(name), depth, type_label(sub), name in required, description, _details(sub)))
            walk(sub, depth + 1)
            items = sub.get("items")
            if sub.get("type") == "array" and isinstance(items, dict):
                walk(items, depth + 1)

    walk(schema, 0)
    return rows


# --- forms ---------------------------------------------------------------------------------------

FIELD_PREFIX = "arg_"
"""Form field names are the argument names with this prefix (an argument may be called "name" or "csrfmiddlewaretoken")."""


class JsonField(forms.CharField):
    """An argument of a type the form has no widget for, entered as JSON."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(widget=forms.Textarea(attrs={"rows": 3, "class": "vLargeTextField"}), **kwargs)

    def to_python(self, value: Any) -> Any:
        text = super().to_python(value)
        if text in ("", None):
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise forms.ValidationError(f"Not valid JSON: {exc}") from exc


def _field(schema: dict[str, Any], required: bool, label: str) -> forms.Field:
    description = schema.get("description") if isinstance(schema.get("description"), str) else ""
    help_text = "; ".join(p for p in (description, _details(schema)) if p)
    common: dict[str, Any] = {"required": required, "label": label, "help_text": help_text}
    kind = schema.get("type")
    if isinstance(schema.get("enum"), list) and all(isinstance(v, str) for v in schema["enum"]):
        choices = [(v, v) for v in schema["enum"]]
        return forms.ChoiceField(choices=([] if required else [("", "—")]) + choices, **common)
    if kind == "string":
        return forms.CharField(strip=False, **common)
    if kind == "integer":
        return forms.IntegerField(**common)
    if kind == "number":
        return forms.FloatField(**common)
    if kind == "boolean":
        if required:
            return forms.TypedChoiceField(choices=[("true", "true"), ("false", "false")], coerce=lambda v: v == "true", **common)
        return forms.NullBooleanField(**common)
    common["help_text"] = "; ".join(p for p in (help_text, f"JSON ({type_label(schema)})") if p)
    return JsonField(**common)


def schema_form(schema: Any, data: Any = None) -> forms.Form:
    """A form with one field per top-level property of an object schema."""
    form = forms.Form(data)
    properties = schema.get("properties") if isinstance(schema, dict) else None
    required = schema.get("required") if isinstance(schema, dict) and isinstance(schema.get("required"), list) else []
    if isinstance(properties, dict):
        for name, sub in list(properties.items())[:MAX_ROWS]:
            form.fields[FIELD_PREFIX + str(name)] = _field(sub if isinstance(sub, dict) else {}, name in required, str(name))
    return form


def prompt_form(arguments: Any, data: Any = None) -> forms.Form:
    """A form for a prompt's arguments (each a string, some required)."""
    form = forms.Form(data)
    for argument in arguments if isinstance(arguments, list) else []:
        if isinstance(argument, dict) and isinstance(argument.get("name"), str):
            description = argument.get("description") if isinstance(argument.get("description"), str) else ""
            form.fields[FIELD_PREFIX + argument["name"]] = forms.CharField(
                label=argument["name"], required=bool(argument.get("required")), help_text=description, strip=False
            )
    return form


TEMPLATE_VARIABLE = re.compile(r"\{([+#./;?&]?)([^{}]+)\}")


def template_variables(uri_template: str) -> list[str]:
    """The variable names of an RFC 6570 URI template, in order."""
    names: list[str] = []
    for _, spec in TEMPLATE_VARIABLE.findall(uri_template):
        for name in spec.split(","):
            name = name.rstrip("*").split(":")[0]
            if name and name not in names:
                names.append(name)
    return names


def template_form(uri_template: str, data: Any = None) -> forms.Form:
    form = forms.Form(data)
    for name in template_variables(uri_template):
        form.fields[FIELD_PREFIX + name] = forms.CharField(label=name, required=True, strip=False)
    return form


def expand_template(uri_template: str, values: dict[str, str]) -> str:
    """Expand the simple forms of an RFC 6570 template ({x}, {+x}, {/x}, {?x,y}); enough for the playground."""

    def one(match: re.Match[str]) -> str:
        operator, spec = match.groups()
        names = [n.rstrip("*").split(":")[0] for n in spec.split(",")]
        safe = ":/?#[]@!$&'()*+,;=" if operator in ("+", "#") else ""
        parts = [(n, quote(values.get(n, ""), safe=safe)) for n in names if values.get(n, "") != ""]
        if operator in ("?", "&"):
            return (operator + "&".join(f"{n}={v}" for n, v in parts)) if parts else ""
        joiner = {"/": "/", ".": ".", ";": ";"}.get(operator, ",")
        prefix = {"/": "/", ".": ".", ";": ";", "#": "#"}.get(operator, "")
        return (prefix + joiner.join(v for _, v in parts)) if parts else ""

    return TEMPLATE_VARIABLE.sub(one, uri_template)


def arguments_of(form: forms.Form) -> dict[str, Any]:
    """The cleaned arguments of a valid form, without the ones left blank."""
    values: dict[str, Any] = {}
    for key, value in form.cleaned_data.items():
        if value is None or value == "":
            continue
        values[key.removeprefix(FIELD_PREFIX)] = value
    return values
