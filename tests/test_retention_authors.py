"""The authors'-code scores (details.authors_score) and per-item scores (item_scores) of the retention
tasks, on hand-made outputs: where the authors' scripts agree with the headline and where their
decoded text (prompt + continuation + <|endoftext|>, clean-up spaces) makes them differ."""
from __future__ import annotations

import pytest

from evaluation.retention.authors import EOT, authors_text, gpt2_cleanup
from evaluation.retention.base import RetentionTask
from evaluation.retention.boolq import BoolQ, BoolQExample
from evaluation.retention.conll03 import TYPES, CoNLL03, CoNLLExample
from evaluation.retention.gsm8k import GSM8K, GSM8KExample
from evaluation.retention.mutual import MuTual, MuTualExample
from evaluation.retention.nq import NQ, NQExample
from evaluation.retention.rte import RTE, RTEExample
from evaluation.retention.samsum import SAMSum, SAMSumExample
from evaluation.retention.sst2 import SST2, SST2Example
from evaluation.retention.suite import TASKS
from tests.conftest import RETENTION_DATA

needs_data = pytest.mark.skipif(not RETENTION_DATA.is_dir(), reason=f"retention data not at {RETENTION_DATA}")
JUNK13 = "\n\nAnna: ok!!!"  # 13 characters the authors' cut removes
assert len(JUNK13) == len(EOT) == 13


def _authors(task, examples, outputs, ended=None) -> list[float | None]:
    return [r["authors"] for r in task.item_scores(examples, outputs, ended)]


def test_authors_text_is_their_decoded_string():
    assert authors_text("Q: x A:", " 5") == EOT + "Q: x A: 5"
    assert authors_text("Q: x A:", "") == EOT + "Q: x A:" + EOT  # an immediate stop shows the end token
    assert gpt2_cleanup("Queen 's Park , we do n't .") == "Queen's Park, we don't."


def test_the_end_token_follows_the_text_exactly_where_the_model_stopped_at_it():
    # they generated one prompt at a time: a row that ended early has one <|endoftext|> after its text
    assert authors_text("Q: x A:", " 5", ended=True) == EOT + "Q: x A: 5" + EOT
    assert authors_text("Q: x A:", " 5", ended=False) == EOT + "Q: x A: 5"
    # SAMSum: their 13-character cut removes the end token of a summary that ended early, text otherwise
    ref = "Tom will buy a puppy tomorrow."
    ex, whole = [SAMSumExample("1", "d", ref)], " Tom will buy a puppy tomorrow."
    assert _authors(SAMSum(), ex, [whole]) == _authors(SAMSum(), ex, [whole], ended=[False])
    assert _authors(SAMSum(), ex, [whole], ended=[True]) == [pytest.approx(1.0, abs=1e-6)]
    assert _authors(SAMSum(), ex, [whole], ended=[False])[0] < 0.75
    assert SAMSum().score(ex, [whole], [True])[1]["authors_score"] == pytest.approx(1.0, abs=1e-6)
    # NQ: the end token fuses with the last word of their prediction, which then matches no answer
    nq = [_nq("A passage.", "Paris")]
    assert _authors(NQ(), nq, ["\nAnswer: Paris"], ended=[False]) == [1.0]
    assert _authors(NQ(), nq, ["\nAnswer: Paris"], ended=[True]) == [0.0]
    with pytest.raises(ValueError, match="1 stop reasons for 2 outputs"):
        RTE().item_scores([RTEExample("a", "b", "entailment")] * 2, [" True", " True"], ended=[True])


# ----------------------------------------------------------------------------------------------
# NQ: their split runs over the whole decoded string, and their loop's state carries over


def _nq(passage: str, answer: str) -> NQExample:
    return NQExample("who wrote the song", f"\n\n{passage}", (answer,))


def test_nq_without_answer_marker_the_authors_search_the_passage():
    ex = [_nq("The song was written by Ada Byrne in 1990.", "Ada Byrne")]
    score, d = NQ().score(ex, [" I am not sure."])
    assert score == 0.0  # the headline reads the continuation only
    assert d["authors_score"] == 1.0  # their prediction is prompt + continuation: the passage holds the gold
    row = NQ().item_scores(ex, [" I am not sure."])[0]
    assert (row["score"], row["authors"], row["standard"]) == (0.0, 1.0, 0.0)


def test_nq_with_answer_marker_the_authors_read_after_it():
    ex = [_nq("The song was written by Ada Byrne in 1990.", "Ada Byrne")] * 2
    out = ["\nAnswer: Ada Byrne", "\nAnswer: nobody knows"]
    rows = NQ().item_scores(ex, out)
    assert [r["authors"] for r in rows] == [1.0, 0.0]  # the passage is before "Answer:": not searched
    assert [r["score"] for r in rows] == [1.0, 0.0] and [r["standard"] for r in rows] == [1.0, 0.0]


def test_nq_authors_rows_replay_their_flag_and_double_counts_in_file_order():
    gold_mid = _nq("Long ago the song came from Ada Byrne of Cork.", "Ada Byrne")
    first = _nq("Nothing here.", "Ada Byrne")
    # a multi-word hit sets their flag; afterwards only spans from the first word are tried, so the
    # passage's "ada byrne" (not at the start) is no longer found
    assert _authors(NQ(), [gold_mid], [" no idea"]) == [1.0]
    assert _authors(NQ(), [first, gold_mid], ["\nAnswer: it was Ada Byrne, yes", " no idea"]) == [1.0, 0.0]
    # a single-word gold met twice inside their span loop counts twice
    ex = [NQExample("q", "\n\nx", ("42",))]
    assert _authors(NQ(), ex, ["\nAnswer: x 42 y 42 z"]) == [2.0]
    score, d = NQ().score(ex, ["\nAnswer: x 42 y 42 z"])
    assert score == 1.0 and d["authors_score"] == 2.0  # their count / n can pass 1


# ----------------------------------------------------------------------------------------------
# SAMSum: the 13-character cut and pltrdy's case-sensitive ROUGE


def _rouge_pltrdy(hyp: str, ref: str) -> float:
    from rouge import Rouge

    s = Rouge().get_scores(hyp, ref)[0]
    return (s["rouge-1"]["f"] + s["rouge-2"]["f"] + s["rouge-l"]["f"]) / 3


def test_samsum_authors_cut_13_characters_and_use_pltrdy_rouge():
    ref = "Tom will buy a puppy tomorrow."
    ex = [SAMSumExample("1", "d", ref)]
    whole = " Tom will buy a puppy tomorrow."
    score, d = SAMSum().score(ex, [whole])
    assert score == pytest.approx(1.0)
    # the cut takes "uppy tomorrow." (words of the reference) off: lower under their rule
    assert d["authors_score"] == pytest.approx(_rouge_pltrdy(whole[:-13], ref)) and d["authors_score"] < 0.75
    # when the last 13 characters are run-on text, the cut leaves the summary whole
    assert _authors(SAMSum(), ex, [whole + JUNK13]) == [pytest.approx(1.0, abs=1e-6)]
    # case-sensitive: rouge-score (the headline) lower-cases, pltrdy does not
    lower = " tom will buy a puppy tomorrow." + JUNK13
    assert SAMSum().score(ex, [lower])[0] == pytest.approx(SAMSum().score(ex, [whole + JUNK13])[0])
    assert _authors(SAMSum(), ex, [lower])[0] == pytest.approx(_rouge_pltrdy(lower[:-13], ref))
    assert _authors(SAMSum(), ex, [lower])[0] < 0.9
    # empty, 1 character after the cut, and only full stops (pltrdy raises; their run would stop): 0
    assert _authors(SAMSum(), ex * 3, ["", " T" + JUNK13, "..." + JUNK13]) == [0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------
# the other six: equal to the headline on ordinary outputs; where their tests differ


def test_gsm8k_authors_equal_headline():
    ex = [GSM8KExample("q", "r\n", a) for a in ("18", "2,125", "5")]
    out = [" 18 dollars.", " 2125", " 5"]
    score, d = GSM8K().score(ex, out)
    assert d["authors_score"] == score == pytest.approx(2 / 3)
    assert [r["standard"] for r in GSM8K().item_scores(ex, out)] == [1.0, 1.0, 1.0]  # commas ignored


def test_rte_authors_equal_headline_and_count_both_words_twice():
    ex = [RTEExample("a", "b", lab) for lab in ("entailment", "not_entailment", "entailment", "not_entailment")]
    score, d = RTE().score(ex, [" True", " false", " False", " Maybe"])
    assert d["authors_score"] == score == 0.5
    # an output holding both words is their TP and TN at once: 1 / 2 of an item
    rows = RTE().item_scores(ex[:1], [" true/false"])
    assert (rows[0]["authors"], rows[0]["authors_denominator"]) == (1.0, 2.0)
    assert RTE().score(ex[:2], [" true/false", " True"])[1]["authors_score"] == pytest.approx(1 / 3)


def test_sst2_authors_equal_headline():
    ex = [SST2Example("s", lab) for lab in (1, 0, 1, 0)]
    score, d = SST2().score(ex, [" Positive", " negative", " neutral", " positive"])
    assert d["authors_score"] == score == 0.5


def test_boolq_after_script_tests_substrings_before_script_exact_leading_space():
    ex = [BoolQExample("q", "p", a) for a in (True, False, True)]
    score, d = BoolQ().score(ex, [" Yes", " no", " maybe"])
    assert d["authors_score"] == d["authors_score_before"] == score == pytest.approx(2 / 3)
    ex = [BoolQExample("q", "p", a) for a in (True, False, True)]
    out = ["yes", " not", " yesterday"]  # no leading space; "no" inside "not"; "yes" inside "yesterday"
    rows = BoolQ().item_scores(ex, out)
    assert [r["score"] for r in rows] == [1.0, 0.0, 0.0]  # ours: stripped, exact
    assert [r["authors"] for r in rows] == [1.0, 1.0, 1.0]  # after-edit script: 'yes' in / 'no' in
    assert [r["authors_before"] for r in rows] == [0.0, 0.0, 0.0]  # unedited script: == ' yes' / ' no'
    assert BoolQ().score(ex[:1], [" yes"])[1]["authors_score_before"] == 1.0


def test_mutual_authors_equal_headline_and_chi_rule_only_after_edit():
    opts = ("o1", "o2", "o3", "o4")
    ex = [MuTualExample(str(i), "art", opts, a) for i, a in enumerate("ABCC")]
    out = [" A", " Both", " b", " Chi"]
    score, d = MuTual().score(ex, out)
    assert d["authors_score"] == score == 0.5
    assert d["authors_score_before"] == 0.75  # their unedited script counts " Chi" as answering C


def _sentence(docstarts: int = 0) -> CoNLLExample:
    words = ("Ada", "Byrne", "played", "at", "Queen", "'s", "Park", ".")
    labels = ("B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "I-LOC", "O")
    return CoNLLExample(words, labels, 1, docstarts)


def test_conll_authors_equal_headline_on_ordinary_outputs():
    ex = [_sentence()]
    out = [" Ada Byrne", " Park", " None", " cricket"]  # PER 1/1, LOC 0/1, ORG -, MISC 0/1
    score, d = CoNLL03().score(ex, out)
    assert d["authors_score"] == score == pytest.approx(1 / 3)


def test_conll_authors_empty_output_clean_up_and_docstart():
    ex = [_sentence()]
    out = [" Ada Byrne", " Queen 's Park", "", ""]  # ORG and MISC: no gold, empty output
    score, d = CoNLL03().score(ex, out)
    # ours: PER 1/1, LOC 1/1, ORG 1/1 and MISC 1/1 (the empty-output branch)
    assert score == 1.0
    # theirs: the decode glues "Queen's Park" (LOC 0/1); an empty output is "<|endoftext|>" to them,
    # so ORG adds nothing (left out) and MISC 0/1
    assert d["authors_score"] == pytest.approx((1 + 0 + 0) / 3)
    rows = CoNLL03().item_scores(ex, out)
    assert [r["authors_denominator"] for r in rows] == [1.0, 1.0, 0.0, 1.0]
    assert [r["authors"] for r in rows] == [1.0, 0.0, None, 0.0]
    # a -DOCSTART- line before the sentence: their reader prompted it, +1 to their MISC total
    rows = CoNLL03().item_scores([_sentence(docstarts=1)], out)
    assert rows[3]["authors_denominator"] == 2.0 and rows[3]["denominator"] == 1.0


# ----------------------------------------------------------------------------------------------
# every task: item_scores aggregate to the headline and to authors_score


def _cases() -> dict[str, tuple[list, list[str]]]:
    opts = ("o1", "o2", "o3", "o4")
    return {
        "gsm8k": ([GSM8KExample("q", "r\n", a) for a in ("18", "7", "2,125")], [" 18", " 8", " 2,125."]),
        "rte": ([RTEExample("a", "b", lab) for lab in ("entailment", "not_entailment", "entailment")],
                [" true", " TRUE false", " no"]),
        "nq": ([_nq("It was Ada Byrne.", "Ada Byrne"), NQExample("q", "\n\nx", ("42",)), _nq("Nobody.", "Cork")],
               [" no idea", "\nAnswer: 42 and 42 again", "\nAnswer: Cork"]),
        "boolq": ([BoolQExample("q", "p", a) for a in (True, False, True)], [" Yes", " not", "yes"]),
        "mutual": ([MuTualExample(str(i), "art", opts, a) for i, a in enumerate("ACD")], [" A", " Chi", " d"]),
        "samsum": ([SAMSumExample(str(i), "d", s) for i, s in enumerate(("Tom will buy a puppy.", "Anna is late."))],
                   [" Tom will buy a puppy tomorrow, says Anna.", ""]),
        "conll03": ([_sentence(1), _sentence()],
                    [" Ada Byrne", " Queen 's Park", "", " None", " Ada", "", " EU", ""]),
        "sst2": ([SST2Example("s", lab) for lab in (1, 0, 1)], [" positive", " negative", " meh"]),
    }


def _aggregate(rows: list[dict], value: str, den: str | None, n_types: int) -> float:
    if n_types > 1:  # CoNLL03: per type, sum of hits over sum of denominators, mean over the types
        rates = []
        for t in range(n_types):
            typ = rows[t::n_types]
            total = sum(r[den] for r in typ)
            if total:
                rates.append(sum(r[value] for r in typ) / total)
        return sum(rates) / len(rates)
    if den is not None:
        return sum(r[value] for r in rows) / sum(r[den] for r in rows)
    return sum(r[value] for r in rows) / len(rows)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_item_scores_aggregate_to_headline_and_authors_score(name: str):
    task, (examples, outputs) = TASKS[name](), _cases()[name]
    assert isinstance(task, RetentionTask)
    rows = task.item_scores(examples, outputs)
    assert len(rows) == len(task.prompts(examples)) == len(outputs)
    assert all({"score", "authors", "standard"} <= set(r) for r in rows)
    headline, details = task.score(examples, outputs)
    conll = name == "conll03"
    n_types = len(TYPES) if conll else 1
    assert headline == pytest.approx(_aggregate(rows, "hits" if conll else "score", "denominator" if conll else None,
                                                n_types))
    den = "authors_denominator" if name in ("rte", "conll03") else None
    authors = _aggregate(rows, "authors_hits" if conll else "authors", den, n_types)
    assert details["authors_score"] == pytest.approx(authors)
    if conll:
        assert all(r["score"] == (r["hits"] / r["denominator"] if r["denominator"] else None) for r in rows)
    if name in ("boolq", "mutual"):
        assert details["authors_score_before"] == pytest.approx(_aggregate(rows, "authors_before", None, 1))
    # the cases are chosen so that the authors' figure differs from the headline, except where their
    # test equals ours on every output (GSM8K, SST-2; MuTual after editing: its unedited script differs)
    if name not in ("gsm8k", "sst2", "mutual"):
        assert details["authors_score"] != pytest.approx(headline)
    if name == "mutual":
        assert details["authors_score_before"] != pytest.approx(headline)


# ----------------------------------------------------------------------------------------------
# on the real files: the claims the authors' splits rest on


MARKERS = {"gsm8k": "Therefore, the answer (arabic numerals) is:", "rte": "answer:", "sst2": "answer:",
           "boolq": "answer:", "mutual": "the answer is", "samsum": "DR:", "conll03": "Entity:"}


@needs_data
@pytest.mark.parametrize("name", sorted(MARKERS))
def test_every_prompt_holds_its_marker_once_at_its_end(name: str):
    """So their split ([1] or [-1]) gives the continuation; NQ's prompts hold no "Answer:" at all."""
    task = TASKS[name]()
    for p in task.prompts(task.load(str(RETENTION_DATA))):
        text = gpt2_cleanup(p)
        assert text.count(MARKERS[name]) == 1 and text.endswith(MARKERS[name])


@needs_data
def test_real_files_nq_prompts_lack_the_marker_and_conll_counts_docstarts():
    assert not any("Answer:" in p for p in NQ().prompts(NQ().load(str(RETENTION_DATA))))
    sentences = CoNLL03().load(str(RETENTION_DATA))
    with open(RETENTION_DATA / "test-NER.txt", encoding="utf-8") as f:
        n_docstart = sum(line.startswith("-DOCSTART-") for line in f)
    assert sentences[0].docstarts_before == 1 and sum(s.docstarts_before for s in sentences) == n_docstart
