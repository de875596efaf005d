"""The multipart glue: any chunking gives the same fields; truncated or malformed bodies are refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbexchange.api.uploads import FormStream, multipart_boundary
from nbexchange.errors import Invalid, UnsupportedMedia

BOUNDARY = b"xYzZY-boundary"


class Collect:
    def __init__(self) -> None:
        self.values: list[bytes] = []

    def start(self) -> None:
        self.values.append(b"")

    def data(self, chunk: memoryview) -> None:
        self.values[-1] += bytes(chunk)


def body(file: bytes, notebooks: list[bytes]) -> bytes:
    out = b""
    for nb in notebooks:
        out += b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="notebooks"\r\n\r\n' + nb + b"\r\n"
    out += (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="assignment"; filename="a.tar.gz"\r\n'
        b"Content-Type: application/gzip\r\n\r\n" + file + b"\r\n--" + BOUNDARY + b"--\r\n"
    )
    return out


def parse(data: bytes, cuts: list[int]) -> tuple[FormStream, Collect, Collect]:
    file, notebooks = Collect(), Collect()
    stream = FormStream(BOUNDARY, {"assignment": file, "notebooks": notebooks})
    last = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        stream.feed(data[last:cut])
        last = cut
    return stream, file, notebooks


@settings(max_examples=200, deadline=None)
@given(
    file=st.binary(max_size=4096),
    notebooks=st.lists(
        st.binary(min_size=1, max_size=20).filter(lambda b: b"\r" not in b and b"-" not in b), max_size=3
    ),
    cuts=st.lists(st.integers(0, 5000), max_size=30),
)
def test_any_chunking_gives_the_same_fields(file, notebooks, cuts):
    data = body(file, notebooks)
    stream, got_file, got_notebooks = parse(data, [c for c in cuts if c <= len(data)])
    assert stream.complete
    assert got_file.values == [file]
    assert got_notebooks.values == notebooks


def test_a_truncated_body_is_not_complete():
    data = body(b"\x1f\x8b" + b"x" * 1000, [b"nb1"])
    stream, got_file, _ = parse(data[:-30], [100, 500])
    assert not stream.complete


def test_a_malformed_body_is_invalid():
    with pytest.raises(Invalid, match="malformed"):
        parse(b"--" + BOUNDARY + b"\r\nno colon here\r\n\r\n", [])


def part(name: bytes, value: bytes, filename: bytes = b"") -> bytes:
    disposition = b'form-data; name="' + name + b'"' + (b'; filename="' + filename + b'"' if filename else b"")
    return b"--" + BOUNDARY + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + value + b"\r\n"


@pytest.mark.parametrize(
    "parts, words",
    [
        ([part(b"other", b"x"), part(b"assignment", b"a", b"a.tar.gz")], "'other'"),
        ([part(b"assignment", b"a", b"a.tar.gz"), part(b"extra", b"x", b"x.bin")], "'extra'"),
        ([part(b"", b"x")], "''"),
    ],
)
def test_only_the_documented_fields_are_taken(parts, words):
    with pytest.raises(Invalid, match=words):
        parse(b"".join(parts) + b"--" + BOUNDARY + b"--\r\n", [])


def test_boundary_comes_from_the_content_type():
    assert multipart_boundary('multipart/form-data; boundary="a b"') == b"a b"
    assert multipart_boundary("multipart/form-data; charset=utf-8; boundary=xyz") == b"xyz"
    for bad in ("multipart/form-data", "text/plain; boundary=xyz", ""):
        with pytest.raises(UnsupportedMedia):
            multipart_boundary(bad)
