"""Scorers and loaders of the Gu et al. 2024 retention suite, on hand-made outputs with known scores
and on the real data files."""
from __future__ import annotations

import json

import pytest

from evaluation.retention.boolq import BoolQ, BoolQExample
from evaluation.retention.conll03 import (
    CoNLL03,
    CoNLLExample,
    authors_entities,
    authors_sentence,
    iob_chunks,
)
from evaluation.retention.gsm8k import GSM8K, GSM8KExample
from evaluation.retention.mutual import MuTual, MuTualExample
from evaluation.retention.nq import NQ, NQExample
from evaluation.retention.rte import RTE, RTEExample
from evaluation.retention.samsum import SAMSum, SAMSumExample
from evaluation.retention.sst2 import SST2, SST2Example
from evaluation.retention.text import (
    authors_nq_loop,
    contains_answer_span,
    normalize_answer,
    split_entity_list,
)
from tests.conftest import RETENTION_DATA

DATA = RETENTION_DATA
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"retention data not at {DATA} (set RETENTION_DATA_DIR)")


# ----------------------------------------------------------------------------------------------
# scorers on hand-made outputs


def test_gsm8k_gold_substring_commas_and_extra_tokens():
    ex = [GSM8KExample("q", "r\n", "18"), GSM8KExample("q", "r\n", "2,125"), GSM8KExample("q", "r\n", "70000"),
          GSM8KExample("q", "r\n", "5")]
    out = [" 18 dollars.\n\nQ", " 2125", " 70,000", " six"]
    score, d = GSM8K().score(ex, out)
    assert score == pytest.approx(1 / 4)  # only "18": the authors compare raw strings
    assert d["solve_rate_commas_ignored"] == pytest.approx(3 / 4)
    assert d["n_items"] == 4 and d["n_correct"] == 1 and d["n_with_digit"] == 3
    # substring semantics: "18" is found inside "180" (as in their `answers in predict`)
    assert GSM8K().score([GSM8KExample("q", "r", "18")], [" 180"])[0] == 1.0


def test_rte_true_means_entailment_and_invalid_bucket():
    ex = [RTEExample("a", "b", lab) for lab in ("entailment", "not_entailment", "entailment", "not_entailment", "entailment")]
    out = [" True", " false", " False", " Maybe", "TRUE"]
    score, d = RTE().score(ex, out)
    assert score == pytest.approx(3 / 5)
    assert d["accuracy_valid"] == pytest.approx(3 / 4)
    assert (d["n_items"], d["n_valid"], d["n_invalid"], d["n_correct"]) == (5, 4, 1, 3)


def test_boolq_exact_yes_no_case_insensitive():
    ex = [BoolQExample("q", "p", a) for a in (True, False, True, False, True)]
    out = [" Yes", "no", " yes.", " No", " yesterday"]
    score, d = BoolQ().score(ex, out)
    assert score == pytest.approx(3 / 5)  # " yes." and " yesterday" are not exact yes/no
    assert d["accuracy_valid"] == 1.0 and d["n_valid"] == 3


def test_sst2_accuracy_all_vs_valid():
    ex = [SST2Example("s", lab) for lab in (1, 0, 1, 0)]
    out = [" Positive", " negative", " neutral", " positive"]
    score, d = SST2().score(ex, out)
    assert score == pytest.approx(2 / 4)
    assert d["accuracy_valid"] == pytest.approx(2 / 3) and d["n_invalid"] == 1


def test_mutual_case_sensitive_letter_and_chi_rule():
    opts = ("o1", "o2", "o3", "o4")
    ex = [MuTualExample(str(i), "art", opts, a) for i, a in enumerate("ABCDBA")]
    out = [" A", " b", " Chi", " D", " Both", " The"]
    score, d = MuTual().score(ex, out)
    # " b" (lower case) and " The" hold no capital A-D -> other; " Chi" -> other (copies "Chioces");
    # " Both" contains "B" -> valid and counted correct for gold B, exactly like the authors' test
    assert score == pytest.approx(3 / 6)
    assert d["n_valid"] == 3 and d["accuracy_valid"] == 1.0


def test_nq_normalisation_and_span_match():
    assert normalize_answer("The  United-States!") == "unitedstates"
    assert normalize_answer("  An apple, a day. ") == "apple day"
    ex = [NQExample("q", "p", ("Åke Törnqvist Blom",)), NQExample("q", "p", ("the United States",)),
          NQExample("q", "p", ("June 3 , 1907",)), NQExample("q", "p", ("42",))]
    out = [" Åke Törnqvist Blom was the first.", "\nAnswer: The United States!",
           " on June 3, 1907 in theatres", " 420 people"]
    score, d = NQ().score(ex, out)
    assert score == pytest.approx(3 / 4)  # "42" is not a whole-word span of "420 people"
    assert d["exact_match"] == pytest.approx(1 / 4)  # only the "Answer:"-prefixed one is an exact match
    assert d["n_correct"] == 3


def test_nq_authors_loop_replica_keeps_their_bugs():
    # a single-word hit inside their span loop `continue`s and can count an item twice
    assert authors_nq_loop(["x 42 y 42 z"], [["42"]]) == 2
    # their `flag` is never reset: after one multi-word hit, later items only try spans from word 0
    preds, golds = ["one two", "p q r s"], [["one two"], ["r s"]]
    assert authors_nq_loop(preds, golds) == 1
    assert sum(contains_answer_span(p, g) for p, g in zip(preds, golds)) == 2


def test_samsum_rouge_identical_disjoint_empty():
    ex = [SAMSumExample("1", "d", "Tom will buy a puppy tomorrow."), SAMSumExample("2", "d", "Anna is late.")]
    score, d = SAMSum().score(ex, [" Tom will buy a puppy tomorrow.", " Weather report: rain"])
    assert score == pytest.approx(0.5)
    assert d["rouge1"] == pytest.approx(0.5) and d["rouge2"] == pytest.approx(0.5) and d["rougeL"] == pytest.approx(0.5)
    score, d = SAMSum().score(ex, ["", "   "])
    assert score == 0.0 and d["n_empty"] == 2
    # text after a repeated "TL;DR:" is what is scored (the authors split on the last "DR:")
    assert SAMSum().score(ex[:1], [" blah TL;DR: Tom will buy a puppy tomorrow."])[0] == pytest.approx(1.0)


def test_conll_helpers_reproduce_authors_quirks():
    assert authors_sentence(["Hello", ",", "world", "."]) == "Hello, world."
    w, lab = ["Ostrand", "beat", "Kelvara"], ["B-LOC", "O", "B-LOC"]
    assert authors_entities(w, lab, "LOC") == ["Ostrand", ""]  # no "O" after the last entity
    assert iob_chunks(w, lab, "LOC") == ["Ostrand", "Kelvara"]
    w, lab = ["N.V.", "Mintwork", "said"], ["B-LOC", "B-ORG", "O"]
    assert authors_entities(w, lab, "LOC") == ["N.V. Mintwork"]  # adjacent entities merge
    assert iob_chunks(w, lab, "LOC") == ["N.V."] and iob_chunks(w, lab, "ORG") == ["Mintwork"]
    assert split_entity_list(" Ada Byrne, N.V.; Glenmoor.\n\nText: x") == ["Ada Byrne", "N.V.", "Glenmoor"]
    assert split_entity_list(" None") == []


def _conll_example():
    words = ("Ada", "Byrne", "took", "four", "for", "Glenmoor", "in", "Velmora", ".")
    labels = ("B-PER", "I-PER", "O", "O", "O", "B-ORG", "O", "B-LOC", "O")
    return CoNLLExample(words, labels, 1)


def test_conll_hit_rate_vs_entity_f1():
    ex = [_conll_example()]
    task = CoNLL03()
    assert task.prompts(ex)[0] == ("Please identify Person Entity from the given text. Text: "
                                   "Ada Byrne took four for Glenmoor in Velmora. Entity:")
    # outputs in prompt order: Person, Location, Organization, Miscellaneous
    out = [" Ada Byrne, Glenmoor", " Velmora\n\nText:", " Glenmoor County Cricket Club", " None"]
    score, d = task.score(ex, out)
    # hits: PER 1/1, LOC 1/1, ORG 1/1 (substring), MISC: no gold and a non-empty output -> 0/1
    assert score == pytest.approx(0.75) and d["hit_rate"] == score
    assert d["hit_rate_MISC"] == 0.0 and d["recall_macro"] == 1.0
    # string-level F1: predicted {Ada Byrne, Glenmoor}, {Velmora}, {Glenmoor County Cricket Club}
    assert d["entity_precision"] == pytest.approx(2 / 4)
    assert d["entity_recall"] == pytest.approx(2 / 3)
    assert d["entity_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # an empty output where there is no entity counts as a hit (their `len(predict) == 0` branch)
    score, d = task.score(ex, out[:3] + [""])
    assert score == pytest.approx(1.0) and d["hit_rate_MISC"] == 1.0


def test_scorers_reject_wrong_output_count():
    with pytest.raises(ValueError, match="outputs"):
        RTE().score([RTEExample("a", "b", "entailment")], [])
    with pytest.raises(ValueError, match="outputs"):
        CoNLL03().score([_conll_example()], [""] * 3)


# ----------------------------------------------------------------------------------------------
# loaders on the real files


@needs_data
@pytest.mark.parametrize("task,count", [(GSM8K, 1319), (RTE, 2489), (NQ, 3610), (BoolQ, 3267), (MuTual, 886),
                                        (SAMSum, 818), (CoNLL03, 3250), (SST2, 872)])
def test_loader_counts_and_limit(task, count):
    full = task().load(str(DATA))
    assert len(full) == count
    assert task().load(str(DATA), limit=3) == full[:3]


@needs_data
def test_first_prompts_match_the_authors_templates():
    d = str(DATA)
    # expected prompts are built from the raw first records, read here (no data text lives in the repo)
    with open(DATA / "test-reasoning.jsonl", encoding="utf-8") as f:
        rec = json.loads(f.readline())
    rationale, answer = rec["answer"].split("#### ")
    assert GSM8K().prompts(GSM8K().load(d, 1)) == [
        f"Q: {rec['question']} A:Let's think step by step. {rationale} Therefore, the answer (arabic numerals) is:"]
    assert rationale.endswith("\n") and GSM8K().load(d, 1)[0].answer == answer
    with open(DATA / "test-NLI.tsv", encoding="utf-8") as f:
        _, sentence1, sentence2, _ = f.read().splitlines()[1].split("\t")
    assert RTE().prompts(RTE().load(d, 1)) == [f"{sentence1} entails the {sentence2}. True or False? answer:"]
    with open(DATA / "test-SentimentAnalysis.tsv", encoding="utf-8") as f:
        text = f.read().splitlines()[1].split("\t")[0]
    assert SST2().prompts(SST2().load(d, 1)) == [
        "For each snippet of text,label the sentiment of the text as positive or negative.The answer should be exact "
        f"'positive' or 'negative'. text: {text} answer:"]
    with open(DATA / "test-NER.txt", encoding="utf-8") as f:
        lines = f.read().split("\n\n")[1].splitlines()  # the first sentence, after -DOCSTART-
    sentence = authors_sentence([line.split(" ")[0] for line in lines])
    assert " ." not in sentence  # "." attached to the word before it, as the authors join
    assert CoNLL03().prompts(CoNLL03().load(d, 1)) == [
        f"Please identify {t} Entity from the given text. Text: {sentence} Entity:"
        for t in ("Person", "Location", "Organization", "Miscellaneous")]

    with open(DATA / "test-OpenDomainQA.jsonl", encoding="utf-8") as f:
        rec = json.loads(f.readline())
    assert NQ().prompts(NQ().load(d, 1)) == [
        f"Refer to the passage below and answer the following question. Passage: {rec['output'][0]} "
        f"Question: {rec['question']}"]
    assert rec["output"][0].startswith("\n\n")
    with open(DATA / "test-ClosedDomainQA.jsonl", encoding="utf-8") as f:
        rec = json.loads(f.readline())
    assert BoolQ().prompts(BoolQ().load(d, 1)) == [
        "Please answer the given question based on the passage. The answer should be exact 'yes' or 'no'. "
        f"passage: {rec['passage']} question: {rec['question']}. answer:"]
    with open(DATA / "test-dialogue" / "dev_1.txt", encoding="utf-8") as f:
        rec = json.loads(f.read())
    o = rec["options"]
    assert MuTual().prompts(MuTual().load(d, 1)) == [
        f"Q: {rec['article']} Which choice is correct? Answer Chioces: (A){o[0]}(B){o[1]}(C){o[2]}(D){o[3]} "
        "A: Among A through D, the answer is"]
    with open(DATA / "test-summarization.json", encoding="utf-8") as f:
        rec = json.load(f)[0]
    assert SAMSum().prompts(SAMSum().load(d, 1)) == [rec["dialogue"] + "\nTL;DR:"]
    assert "\r\n" in rec["dialogue"]


# ----------------------------------------------------------------------------------------------
# malformed and missing files


def test_malformed_records_name_file_and_line(tmp_path):
    (tmp_path / "test-reasoning.jsonl").write_text('{"question": "q", "answer": "r\\n#### 3"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"test-reasoning\.jsonl \(line 2\)"):
        GSM8K().load(str(tmp_path))
    (tmp_path / "test-reasoning.jsonl").write_text('{"question": "q", "answer": "no final answer"}\n')
    with pytest.raises(ValueError, match=r"line 1.*####"):
        GSM8K().load(str(tmp_path))
    (tmp_path / "test-NLI.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"test-NLI\.tsv \(line 3\).*maybe"):
        RTE().load(str(tmp_path))
    (tmp_path / "test-NER.txt").write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP\n")
    with pytest.raises(ValueError, match=r"test-NER\.txt \(line 4\)"):
        CoNLL03().load(str(tmp_path))
    (tmp_path / "test-ClosedDomainQA.jsonl").write_text('{"question": "q", "passage": "p", "answer": "yes"}\n')
    with pytest.raises(ValueError, match=r"line 1.*'answer' should be bool"):
        BoolQ().load(str(tmp_path))


def test_missing_file_names_path_and_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test-SentimentAnalysis\.tsv.*retention\.data_dir="):
        SST2().load(str(tmp_path))
