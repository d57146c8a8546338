"""The one text-file reader behind every corpus setting (data/text_corpus.py) and the settings that use it."""
from __future__ import annotations

import json

import pytest

from baselines.memoir.memory import read_background
from baselines.wise.parts import read_loc_corpus
from data.text_corpus import read_texts
from evaluation.common.errors import ConfigError


def test_txt_and_jsonl_give_their_non_empty_texts_up_to_the_limit(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("  one \n\n two\nthree\n", encoding="utf-8")
    assert read_texts(txt, "k") == ["one", "two", "three"]
    assert read_texts(txt, "k", limit=2) == ["one", "two"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"body": " a "}\n\n{"body": ""}\n{"body": "b"}\n', encoding="utf-8")
    assert read_texts(jsonl, "k", text_field="body") == ["a", "b"]


@pytest.mark.parametrize("name, content, kwargs, message", [
    ("missing.txt", None, {}, r"^k=.*missing\.txt does not exist \(a \.txt file"),
    ("missing.txt", None, {"instead": "'model'"}, r"^k=.*missing\.txt is neither 'model' nor an existing file"),
    ("c.csv", "a\n", {}, r"^k must be a \.txt or \.jsonl file"),
    ("c.jsonl", '{"text": "a"}\nnot json\n', {"field_setting": "editor.f"},
     r"c\.jsonl:2 is not a JSON object with a 'text' field \(set another with editor\.f\)$"),
    ("c.txt", "\n  \n", {}, r"^k=.*c\.txt holds no text$"),
])
def test_each_bad_file_is_one_config_error_naming_the_setting(tmp_path, name, content, kwargs, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        read_texts(path, "k", **kwargs)


def test_wise_reads_records_or_text_files_and_memoir_names_its_model_default(tmp_path):
    records = tmp_path / "loc.json"
    records.write_text(json.dumps([{"loc": "nq question: who", "loc_ans": "me"},
                                   {"prompt": "The capital of France is", "ground_truth": ["Paris"]}]))
    assert read_loc_corpus(str(records)) == ["nq question: who me", "The capital of France is Paris"]
    lines = tmp_path / "loc.txt"
    lines.write_text("x\ny\n")
    assert read_loc_corpus(str(lines)) == ["x", "y"]
    with pytest.raises(ConfigError, match="editor.loc_corpus=.* is neither a .json of CounterFact/ZsRE records"):
        read_loc_corpus(str(tmp_path / "none.json"))
    assert read_background(str(lines), 1) == ["x"]
    with pytest.raises(ConfigError, match="editor.background=.* is neither 'model'"):
        read_background(str(tmp_path / "none.txt"), 1)
