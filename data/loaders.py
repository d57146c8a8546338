"""Loaders for the edit sets, following the ELDER protocol (spec section 6).

The first ``num_edits`` records that have a paraphrase are kept, in file order; the edit prompt is
edited and its paraphrase(s) held out for generalization. Files are read through the ``datasets``
json builder (cached in ``cache_dir``) and every record is validated so a malformed one is named.

Three formats: ``zsre`` (MEND/WISE lifelong split), ``counterfact`` (EasyEdit's flat CounterFact,
one paraphrase and one locality pair per record) and ``counterfact_rome`` (ROME's own CounterFact
records: two paraphrases, ten neighbourhood prompts). ``dataset.target`` picks the edit target's
field where a format has a choice (``TARGETS``). ``dataset.protocol``/``dataset.revisit`` (data/protocol.py)
then turn the facts into the stream: by default the records themselves.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from data.order import check_order, plan_order
from data.protocol import build_stream, check_protocol, is_plain, phrasings_needed
from data.requests import EditRequest
from evaluation.common.errors import HarnessError
from evaluation.common.integrity import file_sha256

log = logging.getLogger(__name__)


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
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a data file: point dataset.path at the JSON file of the edits")
    if not path.is_file():
        raise DataError(
            f"data file not found: {path}. Point the config at it (dataset.path=/path/to/file) "
            f"or fetch it with `python -m data.download --dest <dir>`."
        )
    if cache_dir is not None:
        # keyed by content: the json builder's own key (path, size, mtime) serves stale records for a file
        # rewritten in place within the same second and size
        cache_dir = os.path.join(cache_dir, file_sha256(path)[:16])
    try:
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
        return ds.to_list()
    except Exception as err:  # the json builder's errors are opaque: re-read to say where
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as uerr:
            raise DataError(f"{path}: not valid UTF-8 (byte {uerr.start}: {uerr.reason}); save the file as "
                            f"UTF-8") from None
        except json.JSONDecodeError as jerr:
            raise DataError(f"{path}: not valid JSON (line {jerr.lineno}, column {jerr.colno}): {jerr.msg}") from None
        if not isinstance(raw, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(raw).__name__}") from None
        if not raw:
            raise DataError(f"{path}: the file holds no records") from err
        return raw


def _text(record: Mapping[str, Any], field: str, path: Path, index: int, required: bool = True) -> str:
    value = record.get(field) if isinstance(record, Mapping) else None
    if required and value is None:  # the JSON reader gives every record every key: absent reads as null
        raise DataError(f"{path}: record {index} is malformed: field '{field}' is missing (or null)")
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
    fewer_ok: bool = False,
) -> list[EditRequest]:
    """A flat-format edit set (ZsRE, EasyEdit CounterFact): one paraphrase and one locality pair each.

    ``fewer_ok``: up to ``num_edits`` records, fewer where the file has fewer (no error)."""
    path = Path(path)
    requests: list[EditRequest] = []
    for index, record in _records(path, num_edits, cache_dir):
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
    if not fewer_ok:
        _check_enough(path, requests, num_edits)
    return requests


def _records(path: Path, num_edits: int, cache_dir: str | None) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(index, record) for every record of the file, each checked to be a JSON object."""
    _check_num_edits(num_edits)
    for index, record in enumerate(_read_records(path, cache_dir)):
        if not isinstance(record, Mapping):
            raise DataError(f"{path}: record {index} is not a JSON object")
        yield index, record


def _check_num_edits(num_edits: int) -> None:
    if num_edits < 1:
        raise DataError(f"dataset.num_edits must be at least 1, got {num_edits}")


def _check_enough(path: Path, requests: list[EditRequest], num_edits: int) -> None:
    if len(requests) < num_edits:
        raise DataError(
            f"{path}: asked for {num_edits} edits but only {len(requests)} records have a paraphrase; "
            f"lower dataset.num_edits"
        )


def _warn_repeats(facts: list[EditRequest], path: Path) -> None:
    """Records that repeat an earlier one's prompt and target still count as facts of their own: say so."""
    first: dict[tuple[str, str], int] = {}
    repeats = []
    for r in facts:
        key = (r.prompt, r.target)
        if key in first:
            repeats.append((first[key], r.uid))
        first.setdefault(key, r.uid)
    if repeats:
        shown = ", ".join(f"{b} repeats {a}" for a, b in repeats[:3])
        log.warning("%s: %d of the %d edits repeat an earlier edit's prompt and target (%s%s); each still counts as a "
                    "fact of its own in the metrics (dataset.revisit repeats phrasings on purpose)", path,
                    len(repeats), len(facts), shown, ", ..." if len(repeats) > 3 else "")


_MISSING = object()


def _get(record: Mapping[str, Any], dotted: str) -> Any:
    """``record["a"]["b"]`` for ``"a.b"``; ``_MISSING`` where a level is absent or not an object."""
    node: Any = record
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _rome_text(record: Mapping[str, Any], field: str, path: Path, index: int) -> str:
    value = _get(record, field)
    if value is _MISSING:
        raise DataError(f"{path}: record {index} is malformed: field '{field}' is missing")
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"{path}: record {index} is malformed: field '{field}' must be a non-empty string, got {value!r}"
        )
    return value.strip()


def _rome_texts(record: Mapping[str, Any], field: str, path: Path, index: int) -> list[str]:
    value = _get(record, field)
    if value is _MISSING:
        raise DataError(f"{path}: record {index} is malformed: field '{field}' is missing")
    if not isinstance(value, list):
        raise DataError(
            f"{path}: record {index} is malformed: field '{field}' must be a list of strings, got {value!r}"
        )
    for j, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise DataError(
                f"{path}: record {index} is malformed: field '{field}[{j}]' must be a non-empty string, "
                f"got {item!r}"
            )
    return [item.strip() for item in value]


ROME_TARGET_NEW = "requested_rewrite.target_new.str"


def load_rome_counterfact(
    path: str | Path,
    num_edits: int,
    cache_dir: str | None = None,
    target: str = ROME_TARGET_NEW,
    fewer_ok: bool = False,
) -> list[EditRequest]:
    """ROME's CounterFact records (``counterfact.json`` format) as edit requests.

    Edit prompt: ``requested_rewrite.prompt`` with "{}" replaced by ``requested_rewrite.subject``;
    target: ``requested_rewrite.target_new.str``; every ``paraphrase_prompts`` entry held out for
    generalization; every ``neighborhood_prompts`` entry a locality probe whose answer is
    ``requested_rewrite.target_true.str`` (the subject-free fact the edit must leave alone).
    """
    path = Path(path)
    requests: list[EditRequest] = []
    for index, record in _records(path, num_edits, cache_dir):
        paraphrases = _rome_texts(record, "paraphrase_prompts", path, index)
        if not paraphrases:  # the protocol keeps only records with a paraphrase
            continue
        template = _rome_text(record, "requested_rewrite.prompt", path, index)
        if "{}" not in template:
            raise DataError(
                f"{path}: record {index} is malformed: field 'requested_rewrite.prompt' must contain "
                f"'{{}}' where the subject goes, got {template!r}"
            )
        subject = _rome_text(record, "requested_rewrite.subject", path, index)
        true_answer = _rome_text(record, "requested_rewrite.target_true.str", path, index)
        neighbours = _rome_texts(record, "neighborhood_prompts", path, index)
        if not neighbours:
            raise DataError(
                f"{path}: record {index} is malformed: field 'neighborhood_prompts' is empty "
                f"(the locality probes)"
            )
        requests.append(
            EditRequest.make(
                uid=len(requests),
                prompt=template.replace("{}", subject),
                target=_rome_text(record, target, path, index),
                paraphrases=paraphrases,
                locality=[(n, true_answer) for n in neighbours],
                subject=subject,
                ground_truth=true_answer,
            )
        )
        if len(requests) == num_edits:
            break
    if not fewer_ok:
        _check_enough(path, requests, num_edits)
    return requests


#: ZsRE (MEND/WISE lifelong split): question ``src`` edited to ``alt``, ``rephrase`` held out.
#: CounterFact (EasyEdit flat format): ``prompt`` edited to ``target_new``.
FIELD_MAPS: Mapping[str, FieldMap] = {"zsre": ZSRE_FIELDS, "counterfact": COUNTERFACT_FIELDS}

#: every format's ``dataset.target`` choices -> the record field the edit target is read from; the
#: first choice is the default (``dataset.target: null``). ``rome`` is, for every format, the field
#: ROME's own data loaders use (dsets/zsre.py: ``answers[0]``; dsets/counterfact.py: ``target_new``),
#: so one preset can set ``dataset.target=rome`` across datasets. ZsRE: ``alt`` is WISE/EasyEdit's
#: lifelong target, ``answers`` the true answer (``answers[0]``) that ROME, GRACE and MELO edit to.
TARGETS: Mapping[str, Mapping[str, str]] = {
    "zsre": {"alt": "alt", "answers": "answers", "rome": "answers"},
    "counterfact": {"target_new": "target_new", "rome": "target_new"},
    "counterfact_rome": {"target_new": ROME_TARGET_NEW, "rome": ROME_TARGET_NEW},
}
FORMATS = tuple(TARGETS)


def target_field(name: str, target: str | None) -> str:
    """The record field ``dataset.target`` reads the edit target from in format ``name``."""
    choices = TARGETS[name]
    if target is None:
        return next(iter(choices.values()))
    if target not in choices:
        allowed = ", ".join(choices)
        raise DataError(
            f"dataset.target={target!r} is not a target of the {name} format: allowed are {allowed} "
            f"(or null for the default, {next(iter(choices))})"
        )
    return choices[target]


class EditDataset:
    """A dataset config made object: ``instantiate(cfg.dataset).load()`` gives the edit stream."""

    def __init__(self, name: str, path: str, num_edits: int = 1000, cache_dir: str | None = None,
                 url: str | None = None, sha256: str | None = None, target: str | None = None,
                 max_tokens: int = 512, order: str = "file", order_clusters: int | None = None,
                 order_sequence: str = "first", protocol: str = "one_per_fact", revisit: int = 1,
                 seed: int = 0) -> None:
        if name not in FORMATS:
            raise DataError(f"unknown dataset '{name}': known formats are {sorted(FORMATS)}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise DataError(f"dataset.max_tokens must be a positive integer, got {max_tokens!r}")
        self.name, self.path, self.num_edits, self.cache_dir = name, path, num_edits, cache_dir
        self.max_tokens = max_tokens
        self.url, self.sha256 = url, sha256
        self.target, self.target_field = target, target_field(name, target)  # a bad target fails here
        check_order(order, order_clusters, order_sequence)
        self.order, self.order_clusters, self.order_sequence = order, order_clusters, order_sequence
        check_protocol(protocol, revisit, num_edits, order)
        self.protocol, self.revisit, self.seed = protocol, revisit, seed

    def load(self) -> list[EditRequest]:
        """The edit stream before ``dataset.order``: the first ``num_edits`` usable records (the default), or the
        stream ``dataset.protocol``/``dataset.revisit`` build from the facts (data/protocol.py)."""
        if is_plain(self.protocol, self.revisit):
            return self._facts(self.num_edits)
        _check_num_edits(self.num_edits)
        facts = self._facts(phrasings_needed(self.num_edits, self.revisit), fewer_ok=True)
        return build_stream(facts, self.protocol, self.revisit, self.num_edits, self.seed, source=str(self.path))

    def _facts(self, num: int, fewer_ok: bool = False) -> list[EditRequest]:
        if self.name == "counterfact_rome":
            facts = load_rome_counterfact(self.path, num, self.cache_dir, self.target_field, fewer_ok)
        else:
            fields = replace(FIELD_MAPS[self.name], target=self.target_field)
            facts = load_edit_requests(self.path, fields, num, self.cache_dir, fewer_ok)
        _warn_repeats(facts, self.path)
        return facts

    def check_fits(self, requests: list[EditRequest], tokenizer: Any, context: int | None) -> None:
        """Every text of ``requests`` fits ``max_tokens`` and the model's ``context`` (data.lengths)."""
        from data.lengths import check_lengths

        check_lengths(requests, tokenizer, self.max_tokens, context, source=str(self.path))

    def in_stream_order(self, requests: list[EditRequest], tokenizer: Any, embeddings: Any, batch_size: int,
                        seed: int) -> list[EditRequest]:
        """``requests`` in ``dataset.order`` (data.order): the file's, or LEMoE's plan on the model's embeddings."""
        return plan_order(requests, self.order, tokenizer, embeddings, batch_size=batch_size,
                          clusters=self.order_clusters, sequence=self.order_sequence, seed=seed)
