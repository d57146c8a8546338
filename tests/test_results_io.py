"""write_json_atomic: complete files only, under concurrent writers and failed writes."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from evaluation.common.atomic import write_json_atomic


def test_concurrent_writers_each_replace_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "shared.json"
    payloads = [{"writer": w, "rows": [w] * 20_000} for w in range(4)]
    errors: list[BaseException] = []

    def write(payload: dict) -> None:
        try:
            for _ in range(50):
                write_json_atomic(path, payload)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(path.read_text()) in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]  # no temporary file left behind


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_json_atomic(path, {"score": 0.5})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"score": object()})  # not serialisable: fails mid-write
    assert json.loads(path.read_text()) == {"score": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_format_options(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    write_json_atomic(path, {"b": 1, "a": 2}, indent=1, sort_keys=True)
    assert path.read_text() == '{\n "a": 2,\n "b": 1\n}'
