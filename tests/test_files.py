"""ramjax.files: atomic writes leave the old file or the new one, never a torn one; JSONL errors name file:line."""

import json
import os

import numpy as np
import pytest

from ramjax import files


def test_atomic_write_text_bytes_json_jsonl(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    assert files.atomic_write(p, "héllo") == str(p)
    assert p.read_text(encoding="utf-8") == "héllo"
    files.atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    j = tmp_path / "a.json"
    files.atomic_write_json(j, {"x": "é", "n": [1, 2]})
    assert json.loads(j.read_text(encoding="utf-8")) == {"x": "é", "n": [1, 2]}
    assert "é" in j.read_text(encoding="utf-8")  # UTF-8, not \u-escaped
    jl = tmp_path / "a.jsonl"
    files.atomic_write_jsonl(jl, [{"a": 1}, [2]])
    assert files.read_jsonl(jl) == [{"a": 1}, [2]]
    with files.atomic_writer(tmp_path / "t.npy", binary=True) as f:
        np.save(f, np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), np.arange(3))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.json"
    files.atomic_write_json(p, {"old": True})
    with pytest.raises(ValueError):  # NaN refused half-way through serialising
        files.atomic_write_json(p, {"new": float("nan")}, allow_nan=False)
    with pytest.raises(RuntimeError):
        with files.atomic_writer(p) as f:
            f.write('{"torn": ')
            raise RuntimeError("killed mid-write")
    assert json.loads(p.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["a.json"]


class MyError(Exception):
    pass


@pytest.mark.parametrize("content, match", [
    (b'{"a": 1}\n\n{"a": \n', r"x.jsonl:3: not valid JSON"),
    (b'{"a": 1}\n{"a": "\xff"}\n', r"x.jsonl:2: not valid UTF-8"),
    (b'{"a": 1}\n[1]\n', r"x.jsonl:2: each line must be a JSON object, got list"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, content, match):
    p = tmp_path / "x.jsonl"
    p.write_bytes(content)
    with pytest.raises(MyError, match=match):
        files.read_jsonl(p, error=MyError, objects=True)
    assert files.read_jsonl(p, objects=True, skip_invalid=True) == [{"a": 1}]


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(files.JSONLError, match="does not exist"):
        files.read_jsonl(tmp_path / "nope.jsonl")
    assert [n for n, _ in files.iter_jsonl(_write(tmp_path / "y.jsonl", "1\n\n2\n"))] == [1, 3]


def _write(p, text):
    p.write_text(text)
    return p
