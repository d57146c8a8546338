"""Fetch the public edit sets for users without ../shared/data, verifying sha256 checksums.

    python -m data.download --dest ~/elder-data      # then: python run.py paths.data_dir=~/elder-data

Nothing in the harness needs this where ../shared/data exists. The retention files (Gu et al.
2024) come from the same public repository (JasonForJoy/Model-Editing-Hurt, task-data/).
"""
from __future__ import annotations

import argparse
import urllib.request
from pathlib import Path

from evaluation.common.integrity import file_sha256

RAW = "https://raw.githubusercontent.com"
FILES = {  # relative path under the data dir: (url, sha256)
    "zsre/zsre_mend_eval_portability_gpt4.json": (
        f"{RAW}/JasonForJoy/Model-Editing-Hurt/main/edited-data/zsre_mend_eval_portability_gpt4.json",
        "0cf155da229b2eccae19fcfe5f7a09523363d357f5f15508d1521f495ad5ecd9"),
    "counterfact/counterfact-edit.json": (
        f"{RAW}/qizhou000/RECIPE/main/data/counterfact/counterfact-edit.json",
        "bfe31a7081932739406e282bb625d74222549c3386c15b1df3dfbc3978c69eec"),
    # dataset=counterfact_rome: 500 of ROME's counterfact.json records (https://rome.baulab.info/data/dsets/
    # counterfact.json), as committed to furonglegend/Met (data/counterfact_500.json) at this commit
    "counterfact/rome-counterfact-500.json": (
        f"{RAW}/furonglegend/Met/9a33baa807b2fb0b9bbe72712df82b4fb675c692/data/counterfact_500.json",
        "99a455fe1b99dc332ec1fa921e69fd9297606e9c51d4f108522782f6ad125803"),
}


def fetch(dest: Path) -> None:
    for rel, (url, expected) in FILES.items():
        target = dest / rel
        if target.is_file() and file_sha256(target) == expected:
            print(f"ok       {target}")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        urllib.request.urlretrieve(url, tmp)
        got = file_sha256(tmp)
        if got != expected:
            tmp.unlink()
            raise SystemExit(f"checksum mismatch for {url}: expected {expected}, got {got}")
        tmp.replace(target)
        print(f"fetched  {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, required=True, help="data directory to fill")
    fetch(parser.parse_args().dest.expanduser())


if __name__ == "__main__":
    main()
