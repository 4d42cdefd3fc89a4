"""Input schemas read by people: the rows of the schema table and the playground's form."""

from __future__ import annotations

from django.test import SimpleTestCase

from console import schema

SCHEMA = {
    "type": "object",
    "required": ["city", "days"],
    "properties": {
        "city": {"type": "string", "description": "Where"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "units": {"type": "string", "enum": ["metric", "imperial"], "default": "metric"},
        "verbose": {"type": "boolean"},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}


class SchemaTest(SimpleTestCase):
    def test_rows_flatten_nested_properties_with_what_they_take(self) -> None:
        rows = {row.name: row for row in schema.schema_rows(SCHEMA)}

        assert rows["city"].required and rows["city"].description == "Where" and rows["city"].depth == 0
        assert rows["days"].details == "min 1; max 7"
        assert rows["units"].details == 'one of "metric", "imperial"; default "metric"'
        assert (rows["lat"].depth, rows["lat"].type) == (1, "number")
        assert rows["tags"].type == "array of string"

    def test_the_form_types_and_checks_the_arguments(self) -> None:
        form = schema.schema_form(SCHEMA, {"arg_city": "Oslo", "arg_days": "3", "arg_units": "imperial", "arg_where": '{"lat": 59.9}', "arg_tags": ""})
        assert form.is_valid(), form.errors
        assert schema.arguments_of(form) == {"city": "Oslo", "days": 3, "units": "imperial", "where": {"lat": 59.9}}

        wrong = schema.schema_form(SCHEMA, {"arg_days": "many", "arg_where": "{not json"})
        assert not wrong.is_valid()
        assert set(wrong.errors) == {"arg_city", "arg_days", "arg_where"}

    def test_hostile_schemas_do_not_break_the_page(self) -> None:
        deep: dict = {"type": "object", "properties": {}}
        node = deep
        for _ in range(50):
            node["properties"]["x"] = {"type": "object", "properties": {}}
            node = node["properties"]["x"]
        assert len(schema.schema_rows(deep)) == schema.MAX_DEPTH + 1
        assert schema.schema_rows("not a schema") == [] and schema.schema_rows({"properties": ["x"]}) == []
        assert list(schema.schema_form({"properties": {"a": "nonsense"}}).fields) == ["arg_a"]

    def test_uri_templates_expand_their_variables(self) -> None:
        template = "file:///{+path}{?mode}"
        assert schema.template_variables(template) == ["path", "mode"]
        assert schema.expand_template(template, {"path": "a b/c.txt", "mode": "r"}) == "file:///a%20b/c.txt?mode=r"
        assert schema.expand_template("users://{id}/profile", {"id": "a/b"}) == "users://a%2Fb/profile"
