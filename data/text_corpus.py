"""A local text corpus for the second-moment statistics (``editor.mom2_corpus=FILE``), from files already here.

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

SOURCES = {"counterfact-facts": "counterfact/counterfact-train.json"}


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
