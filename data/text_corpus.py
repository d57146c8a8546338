"""Text corpora from files: the one reader of a text file (:func:`read_texts`) that every corpus setting uses
(ROME's and MEMIT's ``editor.mom2_corpus``, WISE's ``editor.loc_corpus``, MEMOIR's ``editor.background``, the
superposition report's ``--corpus``), and a local corpus for the second-moment statistics built from files
already here:

    python -m data.text_corpus counterfact-facts ~/.cache/elder-harness/corpora/counterfact_facts.txt

``counterfact-facts``: one true fact per line, "{prompt} {ground_truth}.", from CounterFact's train split
(10,000 human-templated sentences, none of them an edit of the stream's counterfact-edit.json records; some
subjects recur). The authors' corpus is 100,000 Wikipedia texts, which are not here; this is the closest text
of the world's facts that is. Never build a corpus from the retention suite's items (docs/locate_then_edit.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluation.common.atomic import write_text_atomic
from evaluation.common.errors import ConfigError

TEXT_SUFFIXES = (".txt", ".jsonl")

SOURCES = {"counterfact-facts": "counterfact/counterfact-train.json"}


def read_texts(path: str | Path, setting: str, limit: int | None = None, text_field: str = "text",
               instead: str = "", field_setting: str = "") -> list[str]:
    """The first ``limit`` (all: None) non-empty texts of a ``.txt`` file (one per line) or a ``.jsonl`` file
    (each line a JSON object whose ``text_field`` is the text), outer white space stripped.

    Anything wrong is one :class:`ConfigError` naming ``setting`` (the key or option that gave ``path``):
    no such file, another suffix, a JSONL line without the field, no text. ``instead`` names what else the
    setting takes (e.g. "'model' (texts the model samples itself)") and ``field_setting`` the key that sets
    ``text_field``, for the messages."""
    file = Path(path).expanduser()
    kinds = f"a .txt file with one text per line, or a .jsonl file with a '{text_field}' field"
    if not file.is_file():
        raise ConfigError(f"{setting}={path} is neither {instead} nor an existing file ({kinds})" if instead else
                          f"{setting}={path} does not exist ({kinds})")
    suffix = file.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise ConfigError(f"{setting} must be a .txt or .jsonl file ({kinds}), got {path}")
    texts: list[str] = []
    with open(file, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if limit is not None and len(texts) >= limit:
                break
            if not line.strip():
                continue
            if suffix == ".jsonl":
                try:
                    line = str(json.loads(line)[text_field])
                except (json.JSONDecodeError, KeyError, TypeError):
                    where = f" (set another with {field_setting})" if field_setting else ""
                    message = f"{file}:{number} is not a JSON object with a '{text_field}' field{where}"
                    raise ConfigError(message) from None
            if line.strip():
                texts.append(line.strip())
    if not texts:
        raise ConfigError(f"{setting}={path} holds no text")
    return texts


def counterfact_facts(data_dir: Path) -> list[str]:
    records = json.loads((data_dir / SOURCES["counterfact-facts"]).read_text(encoding="utf-8"))
    return [f"{r['prompt'].strip()} {r['ground_truth'].strip()}." for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=sorted(SOURCES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    args = parser.parse_args()
    path = args.data_dir / SOURCES[args.source]
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: give --data-dir (the folder holding counterfact/)")
    lines = counterfact_facts(args.data_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"{len(lines)} texts written to {args.out}")


if __name__ == "__main__":
    main()
