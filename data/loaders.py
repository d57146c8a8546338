"""Loaders for the two edit sets, following the ELDER protocol (spec section 6).

The first ``num_edits`` records that have a paraphrase are kept, in file order; the edit prompt is
edited and its paraphrase is held out for generalization. Files are read through the ``datasets``
json builder (cached in ``cache_dir``) and every record is validated so a malformed one is named.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from data.requests import EditRequest
from evaluation.errors import HarnessError


class DataError(HarnessError, ValueError):
    """A data file is missing or a record in it is malformed."""


@dataclass(frozen=True)
class FieldMap:
    """Which field of a record plays which role."""

    prompt: str
    target: str
    paraphrase: str
    locality_prompt: str
    locality_answer: str
    subject: str
    ground_truth: str


ZSRE_FIELDS = FieldMap("src", "alt", "rephrase", "loc", "loc_ans", "subject", "answers")
COUNTERFACT_FIELDS = FieldMap(
    "prompt", "target_new", "rephrase_prompt", "locality_prompt", "locality_ground_truth",
    "subject", "ground_truth",
)


def _read_records(path: Path, cache_dir: str | None) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(
            f"data file not found: {path}. Point the config at it (dataset.path=/path/to/file) "
            f"or fetch it with `python -m data.download --dest <dir>`."
        )
    try:
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
        return ds.to_list()
    except Exception as err:  # the json builder's errors are opaque: re-read to say where
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as jerr:
            raise DataError(f"{path}: not valid JSON (line {jerr.lineno}, column {jerr.colno}): {jerr.msg}") from None
        if not isinstance(raw, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(raw).__name__}") from None
        if not raw:
            raise DataError(f"{path}: the file holds no records") from err
        return raw


def _text(record: Mapping[str, Any], field: str, path: Path, index: int, required: bool = True) -> str:
    value = record.get(field) if isinstance(record, Mapping) else None
    if isinstance(value, list):  # ZsRE `answers` is a list of gold answers
        value = value[0] if value else ""
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise DataError(
            f"{path}: record {index} is malformed: field '{field}' must be a non-empty string, "
            f"got {value!r}"
        )
    return value.strip()


def load_edit_requests(
    path: str | Path,
    fields: FieldMap,
    num_edits: int,
    cache_dir: str | None = None,
) -> list[EditRequest]:
    path = Path(path)
    if num_edits < 1:
        raise DataError(f"dataset.num_edits must be at least 1, got {num_edits}")
    records = _read_records(path, cache_dir)
    requests: list[EditRequest] = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(f"{path}: record {index} is not a JSON object")
        paraphrase = record.get(fields.paraphrase)
        if isinstance(paraphrase, list):
            paraphrase = paraphrase[0] if paraphrase else None
        if not paraphrase:  # the protocol keeps only records with a paraphrase
            continue
        requests.append(
            EditRequest(
                uid=len(requests),
                prompt=_text(record, fields.prompt, path, index),
                target=_text(record, fields.target, path, index),
                paraphrase=_text(record, fields.paraphrase, path, index),
                locality_prompt=_text(record, fields.locality_prompt, path, index),
                locality_answer=_text(record, fields.locality_answer, path, index),
                subject=_text(record, fields.subject, path, index, required=False),
                ground_truth=_text(record, fields.ground_truth, path, index, required=False),
            )
        )
        if len(requests) == num_edits:
            break
    if len(requests) < num_edits:
        raise DataError(
            f"{path}: asked for {num_edits} edits but only {len(requests)} records have a paraphrase; "
            f"lower dataset.num_edits"
        )
    return requests


#: ZsRE (MEND/WISE lifelong split): question ``src`` edited to ``alt``, ``rephrase`` held out.
#: CounterFact (EasyEdit flat format): ``prompt`` edited to ``target_new``.
FIELD_MAPS: Mapping[str, FieldMap] = {"zsre": ZSRE_FIELDS, "counterfact": COUNTERFACT_FIELDS}


class EditDataset:
    """A dataset config made object: ``instantiate(cfg.dataset).load()`` gives the edit stream."""

    def __init__(self, name: str, path: str, num_edits: int = 1000, cache_dir: str | None = None,
                 url: str | None = None, sha256: str | None = None) -> None:
        if name not in FIELD_MAPS:
            raise DataError(f"unknown dataset '{name}': known formats are {sorted(FIELD_MAPS)}")
        self.name, self.path, self.num_edits, self.cache_dir = name, path, num_edits, cache_dir
        self.url, self.sha256 = url, sha256

    def load(self) -> list[EditRequest]:
        return load_edit_requests(self.path, FIELD_MAPS[self.name], self.num_edits, self.cache_dir)
