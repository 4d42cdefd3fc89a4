"""`naming.canonical_uri`: the one form of a resource URI (RFC 3986 §6.2.2), as properties and rows."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.naming import canonical_uri, is_ambiguous_uri

UNRESERVED = string.ascii_letters + string.digits + "-._~"
SUB_DELIMS = "!$&'()*+,;=:@"


def encode(char: str, upper: bool) -> str:
    escape = f"%{ord(char):02X}"
    return escape if upper else escape.lower()


@st.composite
def uri_and_variant(draw: st.DrawFn) -> tuple[str, str]:
    """A URI, and the same URI with unreserved characters percent-encoded and cases changed at random."""
    scheme = draw(st.from_regex(r"[a-z][a-z0-9+.-]{0,6}", fullmatch=True))
    host = draw(st.from_regex(r"[a-z0-9.-]{0,12}", fullmatch=True))
    segments = draw(st.lists(st.text(alphabet=UNRESERVED + SUB_DELIMS, max_size=8).filter(lambda s: s not in (".", "..")), max_size=5))
    query = draw(st.none() | st.text(alphabet=UNRESERVED + SUB_DELIMS + "/?", max_size=10))
    plain = f"{scheme}://{host}/" + "/".join(segments) + (f"?{query}" if query is not None else "")

    def vary(text: str, *, fold: bool = False) -> str:
        out = ""
        for char in text:
            if char in UNRESERVED and draw(st.booleans()):
                out += encode(char, draw(st.booleans()))
            elif fold and draw(st.booleans()):
                out += char.upper()
            else:
                out += char
        return out

    variant = "".join(c.upper() if draw(st.booleans()) else c for c in scheme) + "://" + vary(host, fold=True) + "/"
    variant += "/".join(vary(s) for s in segments) + (f"?{vary(query)}" if query is not None else "")
    return plain, variant


@given(st.text())
def test_canonicalisation_is_idempotent_on_any_text(text: str) -> None:
    once = canonical_uri(text)
    assert canonical_uri(once) == once


@given(uri_and_variant())
def test_any_percent_encoding_variant_of_unreserved_chars_canonicalises_to_the_same_value(pair: tuple[str, str]) -> None:
    plain, variant = pair
    assert canonical_uri(variant) == canonical_uri(plain)
    assert canonical_uri(canonical_uri(variant)) == canonical_uri(variant)


@given(uri_and_variant())
def test_the_aggregated_form_canonicalises_the_upstream_uri(pair: tuple[str, str]) -> None:
    plain, variant = pair
    assert canonical_uri(f"FEDMCP://everything/{variant}") == f"fedmcp://everything/{canonical_uri(plain)}"


@pytest.mark.parametrize(
    ("uri", "canonical"),
    [
        ("test://template/4%32/data", "test://template/42/data"),
        ("TEST://Template/42/data", "test://template/42/data"),
        ("test://template/./42/data", "test://template/42/data"),
        ("test://template/x/../42/data", "test://template/42/data"),
        ("test://template/x/%2e%2E/42/data", "test://template/42/data"),
        ("test://template/a%2fb/data", "test://template/a%2Fb/data"),  # never a path separator
        ("test://template/a%20b", "test://template/a%20b"),  # reserved and other escapes stay escaped
        ("test://t/100%", "test://t/100%25"),  # a stray '%' is a literal one
        ("test://User%41@HOST/p?Q=%7e#F%2E", "test://UserA@host/p?Q=~#F."),  # user information keeps its case
        ("test://A%2fB%5a/x", "test://a%2Fbz/x"),  # the host's case folds, its escapes stay upper case
        ("urn:isbn:0451450523", "urn:isbn:0451450523"),
        ("file:///srv/../etc/passwd", "file:///etc/passwd"),
        ("fedmcp://everything/TEST://template/./42/data", "fedmcp://everything/test://template/42/data"),
    ],
)
def test_canonical_forms(uri: str, canonical: str) -> None:
    assert canonical_uri(uri) == canonical


@pytest.mark.parametrize(
    ("uri", "ambiguous"),
    [
        ("test://template/x%2F..%2F42/data", True),
        ("test://template/..%2Fsecret", True),
        ("test://template/x%5C..%5C42", True),
        ("fedmcp://everything/test://template/x%2F..%2F42/data", True),
        ("test://template/a%2Fb/data", False),
        ("test://template/a..b/data", False),
    ],
)
def test_a_dot_segment_next_to_an_encoded_separator_is_ambiguous(uri: str, ambiguous: bool) -> None:
    assert is_ambiguous_uri(canonical_uri(uri)) is ambiguous
