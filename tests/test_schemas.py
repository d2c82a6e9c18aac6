"""The format-v1 JSON Schemas: every conformance fixture is a test case (OME-Zarr style)."""

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from koopkit.errors import InvalidRunIdError
from koopkit.store import layout
from koopkit.store.schema import NODE_KINDS, check_version, schema, validate_attrs

FIXTURES = Path(__file__).parent / "fixtures" / "attributes"
FIXTURE_FILES = sorted(FIXTURES.glob("*/*/*.json"))


def load_fixture(path):
    """(node, expected conformance, attributes without the _conformance key)."""
    attrs = json.loads(path.read_text(encoding="utf-8"))
    return path.parent.name, attrs.pop("_conformance"), attrs


def test_fixtures_cover_every_node_kind():
    kinds = {(p.parent.parent.name, p.parent.name) for p in FIXTURE_FILES}
    assert kinds == {(v, n) for v in ("valid", "invalid") for n in NODE_KINDS}


@pytest.mark.parametrize(
    "path", FIXTURE_FILES, ids=[str(p.relative_to(FIXTURES)) for p in FIXTURE_FILES]
)
def test_fixture(path):
    node, conformance, attrs = load_fixture(path)
    assert conformance["valid"] == (path.parent.parent.name == "valid")
    assert conformance["reason"]
    reasons = validate_attrs(node, attrs)
    if conformance["valid"]:
        assert reasons == []
    else:
        # Fails, and only for the rule the fixture names: every reason is at its key path.
        at_path = re.compile(rf"{node}: {re.escape(conformance['path'])}[:.\[]")
        assert reasons and all(at_path.match(r) for r in reasons), reasons


@pytest.mark.parametrize("node", NODE_KINDS)
def test_schema_is_valid_and_versioned(node):
    s = schema(node)
    Draft202012Validator.check_schema(s)
    assert s["$id"] == f"https://koopkit.dev/schemas/{layout.FORMAT_VERSION}/{node}.schema.json"
    assert s["properties"]["koopkit"]["properties"]["version"] == {"$ref": "_version.schema.json"}


def test_version_schema_matches_layout():
    from importlib.resources import files

    version = json.loads((files("koopkit") / "schemas" / "_version.schema.json").read_text())
    Draft202012Validator.check_schema(version)
    assert (
        version["$id"]
        == f"https://koopkit.dev/schemas/{layout.FORMAT_VERSION}/_version.schema.json"
    )
    assert version["enum"] == [layout.FORMAT_VERSION]


def test_writer_blocks_are_valid():
    """The blocks layout.py builds for the writer pass their own schemas."""
    assert validate_attrs("store", layout.root_attrs()) == []
    assert validate_attrs("static", {"koopkit": layout.node_block("static")}) == []


def test_unknown_node_is_a_programming_error():
    with pytest.raises(ValueError, match="Invalid node kind 'runs'; known: store, run"):
        validate_attrs("runs", {})


def test_schema_returns_a_copy():
    schema("run")["properties"].clear()
    assert "run_id" in schema("run")["properties"]


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ({"node": "run", "version": "1.0"}, None),
        ({"node": "run"}, None),  # missing: the schema says so
        (None, None),
        ({"version": "2.0"}, "format version '2.0' is not supported by this koopkit (reads 1.x)"),
        ({"version": "1.1"}, "format version '1.1' is not supported by this koopkit (reads 1.0)"),
        ({"version": 1.0}, "format version 1.0 is not a string like '1.0'"),
    ],
)
def test_check_version(block, expected):
    assert check_version(block) == expected


def test_future_version_is_one_clear_reason():
    attrs = {"koopkit": {"node": "run", "version": "2.0", "new": 1}, "run_id": 5}
    assert validate_attrs("run", attrs) == [
        "run: koopkit.version: format version '2.0' is not supported by this koopkit (reads 1.x)"
    ]


def test_reason_names_path_and_types():
    attrs = json.loads((FIXTURES / "valid/run/minimal.json").read_text())
    del attrs["_conformance"]
    attrs["tags"] = {"width": [1, 2]}
    assert validate_attrs("run", attrs) == [
        "run: tags.width: [1, 2] is not of type 'string', 'number', 'boolean', 'null'"
    ]


@pytest.mark.parametrize("key", ["run_id", "koopkit_version", "device", "created"])
def test_huge_string_gives_a_short_reason(key):
    attrs = json.loads((FIXTURES / "valid/run/minimal.json").read_text())
    del attrs["_conformance"]
    attrs[key] = "x" * 1_000_000
    reasons = validate_attrs("run", attrs)
    assert reasons and all(r.startswith(f"run: {key}: ") and len(r) < 300 for r in reasons)


def test_deep_nesting_is_a_reason_not_a_crash():
    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert validate_attrs("run", deep) == ["run: attributes: nested too deeply to validate"]


def test_many_errors_are_capped():
    attrs = {"koopkit": {"node": "run", "version": "1.0"}, "committed_steps": {}}
    attrs["committed_steps"] = {f"bad{i}": -1 for i in range(10_000)}
    reasons = validate_attrs("run", attrs)
    assert len(reasons) <= 51 and reasons[-1] == "run: (further reasons not shown)"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
KNOWN_KEYS = sorted(
    {k for node in NODE_KINDS for k in schema(node)["properties"]} | {"node", "version", "format"}
)
# Objects whose keys are the schemas' own reach past the top-level type check.
near_attrs = st.dictionaries(
    st.sampled_from(KNOWN_KEYS),
    json_values | st.dictionaries(st.sampled_from(KNOWN_KEYS), json_values, max_size=3),
    max_size=8,
)


@given(node=st.sampled_from(NODE_KINDS), attrs=json_values | near_attrs)
def test_validate_attrs_never_raises(node, attrs):
    reasons = validate_attrs(node, attrs)
    assert isinstance(reasons, list) and all(isinstance(r, str) for r in reasons)


@given(
    path=st.sampled_from(FIXTURE_FILES),
    key=st.sampled_from(KNOWN_KEYS),
    value=json_values,
)
def test_mutated_fixture_never_raises(path, key, value):
    node, _, attrs = load_fixture(path)
    attrs[key] = value
    reasons = validate_attrs(node, attrs)
    assert all(isinstance(r, str) and r.startswith(f"{node}: ") for r in reasons)


# No "\n": layout's ``$`` accepts one trailing newline, which the schema rejects (fixture
# invalid/run/run_id_trailing_newline.json).
@given(st.text(alphabet="ab./\\\x00=", max_size=12))
def test_run_id_pattern_agrees_with_layout(run_id):
    """The schema and ``layout.check_run_id`` accept the same run ids."""
    attrs = json.loads((FIXTURES / "valid/run/minimal.json").read_text())
    del attrs["_conformance"]
    attrs["run_id"] = run_id
    try:
        layout.check_run_id(run_id)
        accepted = True
    except InvalidRunIdError:
        accepted = False
    assert (validate_attrs("run", attrs) == []) == accepted
