"""evaluate.py: scorers on real-looking completions, hostile inputs, metrics by hand, loading, the command.

Layers: hand-labelled completions (math and multiple choice); hostile completions (bounded time,
nothing executed, nothing logged); scoring from threads and worker processes; pass@k against
brute-force enumeration; synthetic generators; loading every fixture schema; evaluate() with a
scripted sampler (metrics by hand); the command end to end on the tiny offline model (in process,
as a subprocess, and under torchrun with 2 ranks).
"""
import concurrent.futures as cf
import itertools
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import evaluate as E
import rollout

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
FIXTURES = {"math": "math.jsonl", "math500": "math500.json", "gsm-hard": "gsm-hard.jsonl", "amc23": "amc23.parquet",
            "medqa": "medqa.jsonl", "medmcqa": "medmcqa.parquet", "mmlu-medical": "mmlu-medical.json"}


def ex(answer):
    """A MATH-500-schema row with the given gold answer."""
    return {"problem": "p", "answer": answer}


# ----------------------------------------------------------------------------------------------
# Math scorer: (completion, gold, expected) on real-looking completions

MATH_CASES = [
    # equivalent forms
    ("So $x = \\frac{1}{2}$ and the answer is $\\boxed{\\frac{1}{2}}$.", "0.5", 1),
    ("Dividing, we get \\boxed{0.5}.", "\\frac12", 1),
    ("Therefore the probability is \\boxed{\\dfrac{3}{4}}.", "\\frac{3}{4}", 1),
    ("The fraction simplifies to $\\boxed{\\tfrac34}$", "0.75", 1),
    ("Hence $\\boxed{-\\frac{1}{3}}$.", "-1/3", 1),
    ("Hence $\\boxed{\\frac{1}{3}}$.", "-\\frac13", 0),
    ("$\\sqrt{8} = \\boxed{2\\sqrt{2}}$", "\\sqrt{8}", 1),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{1}{2}\\sqrt{3}", 1),
    ("The largest root is \\boxed{\\infty}", "\\infty", 1),
    ("The sum is \\boxed{1,000,000}.", "1000000", 1),
    ("Approximately \\boxed{\\pi}", "3.14159", 0),
    # units, percent, currency, degrees
    ("Each side is \\boxed{10\\text{ cm}}.", "10", 1),
    ("Each side is \\boxed{10 \\text{cm}}.", "10", 1),
    ("The angle measures \\boxed{90^\\circ}.", "90", 1),
    ("The discount is \\boxed{5\\%}.", "5", 1),
    ("She paid \\boxed{\\$18.90}.", "18.90", 1),
    # text answers in a box
    ("The winner is \\boxed{\\text{Evelyn}}.", "\\text{Evelyn}", 1),
    ("The winner is \\boxed{Evelyn}.", "\\text{Evelyn}", 1),
    ("The function is \\boxed{\\text{odd}}.", "\\text{odd}", 1),
    ("The function is \\boxed{\\text{even}}.", "\\text{odd}", 0),
    ("Choice \\boxed{\\text{(C)}} is right.", "\\text{(C)}", 1),
    # tuples, intervals, sets, equations, matrices
    ("The point is \\boxed{(3, 4)}.", "(3,4)", 1),
    ("The point is \\boxed{(4, 3)}.", "(3,4)", 0),
    ("The solution set is \\boxed{[1, 2)}.", "[1,2)", 1),
    ("The solution set is \\boxed{(1, 2)}.", "[1,2)", 0),
    ("So \\boxed{x = 6}.", "6", 1),
    ("The line is \\boxed{y = 2x + 3}.", "2x+3", 1),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 1),
    # plain integers, right and wrong, box spellings
    ("\\boxed{6}", "6", 1),
    ("\\boxed{7}", "6", 0),
    ("The answer is \\fbox{6}.", "6", 1),
    ("The answer is $\\boxed 6$.", "6", 1),
    # several boxes: the last one counts
    ("First I got \\boxed{3}, but correcting the sign error gives \\boxed{5}.", "5", 1),
    ("\\boxed{5} ... wait, let me recheck: \\boxed{3}", "5", 0),
    # no box: the fallbacks, and nothing at all
    ("The final answer is $\\frac{7}{8}$.", "\\frac{7}{8}", 1),
    ("Final answer: 42", "42", 1),
    ("She has 3 apples, buys 5 more, so 8 in total", "8", 1),
    ("The total is 8, not 9", "8", 0),
    ("I am not sure how to solve this.", "5", 0),
    ("\\boxed{}", "5", 0),
    ("", "5", 0),
    # Qwen3 think blocks: only what follows </think> counts; an unclosed block has no answer
    ("<think>Maybe \\boxed{4}? No.</think>The answer is \\boxed{5}.", "5", 1),
    ("<think>It is \\boxed{5}.</think>\n\\boxed{4}", "5", 0),
    ("<think>Adding up, we get 5, so \\boxed{5}", "5", 0),
    ("<think>\\boxed{5}</think>", "5", 0),
]


@pytest.mark.parametrize("completion,gold,expected", MATH_CASES)
def test_math_scorer_verdicts(completion, gold, expected):
    assert E.score("math500", completion, ex(gold)) == expected


def test_math_case_count_and_gold_from_solution():
    assert len(MATH_CASES) >= 40
    row = {"problem": "p", "level": "Level 2", "type": "Algebra",
           "solution": "First $\\boxed{x}$ is a variable; then $y = \\boxed{\\frac{7}{8}}$."}
    assert E.BENCHES["math"].gold(row) == "\\frac{7}{8}"        # last box of the solution
    assert E.score("math", "So \\boxed{0.875}.", row) == 1.0
    assert E.score("gsm-hard", "He gets \\boxed{3737022} marbles.", {"input": "q", "target": 3737022.0}) == 1.0
    assert E.score("gsm-hard", "The answer is \\boxed{\\frac{70}{3}}", {"input": "q", "target": 23.333333333333332}) == 1.0
    assert E.score("amc23", "\\boxed{7}", {"question": "q", "answer": 7.0}) == 1.0


def test_last_boxed_nesting_and_escapes():
    assert E.last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert E.last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert E.last_boxed("\\boxed{1} and \\boxed{2") == "1"                 # an unclosed last box is skipped
    assert E.last_boxed("no box") is None


# ----------------------------------------------------------------------------------------------
# Multiple-choice scorer

MEDQA = {"question": "A 54-year-old man with type 2 diabetes ... most appropriate initial medication?",
         "options": {"A": "Insulin glargine", "B": "Glipizide", "C": "Metformin", "D": "Pioglitazone"},
         "answer_idx": "C", "answer": "Metformin"}
MEDMCQA = {"question": "Which vitamin is synthesised in the skin?", "opa": "Vitamin A", "opb": "Vitamin C",
           "opc": "Vitamin D", "opd": "Vitamin K", "cop": 2}
MMLU = {"question": "Which bone forms the prominence of the cheek?", "subject": "anatomy",
        "choices": ["Maxilla", "Zygomatic bone", "Nasal bone", "Sphenoid bone"], "answer": 1}

CHOICE_CASES = [  # (bench, example, completion, expected extracted letter or None); medqa gold C
    ("medqa", MEDQA, "<think>First-line therapy is metformin.</think><answer>C</answer>", "C"),
    ("medqa", MEDQA, "<think>reasoning</think>\n<answer> C </answer>", "C"),
    ("medqa", MEDQA, "<think>x</think><answer>(C)</answer>", "C"),
    ("medqa", MEDQA, "<think>x</think><answer>C. Metformin</answer>", "C"),
    ("medqa", MEDQA, "<think>x</think><answer>Metformin</answer>", "C"),
    ("medqa", MEDQA, "<think>x</think><answer>metformin.</answer>", "C"),
    ("medqa", MEDQA, "<think>x</think><answer>B</answer>", "B"),
    ("medqa", MEDQA, "<think>The answer is C.</think><answer>B</answer>", "B"),
    ("medqa", MEDQA, "<think>Metformin lowers glucose.</think><answer>C", "C"),
    ("medqa", MEDQA, "<think>Thinking about sulfonylureas and metformin... the answer is C", None),
    ("medqa", MEDQA, "The answer is (C).", "C"),
    ("medqa", MEDQA, "Metformin is first line, so the answer is C.", "C"),
    ("medqa", MEDQA, "the answer is c", "C"),
    ("medqa", MEDQA, "Answer: C", "C"),
    ("medqa", MEDQA, "Answer: **C**", "C"),
    ("medqa", MEDQA, "**Answer:** C", "C"),
    ("medqa", MEDQA, "**Answer: C. Metformin**", "C"),
    ("medqa", MEDQA, "Final answer: C", "C"),
    ("medqa", MEDQA, "answer: [C]", "C"),
    ("medqa", MEDQA, "**C**", "C"),
    ("medqa", MEDQA, "Of these, **C. Metformin** is preferred.", "C"),
    ("medqa", MEDQA, "C) Metformin", "C"),
    ("medqa", MEDQA, "(C) Metformin", "C"),
    ("medqa", MEDQA, "(c) metformin", "C"),
    ("medqa", MEDQA, "C: Metformin", "C"),
    ("medqa", MEDQA, "C", "C"),
    ("medqa", MEDQA, "C.", "C"),
    ("medqa", MEDQA, "The correct option is C.", "C"),
    ("medqa", MEDQA, "The best choice is (c)", "C"),
    ("medqa", MEDQA, "Option C is correct because it does not cause hypoglycemia.", "C"),
    ("medqa", MEDQA, "The correct answer is option C: Metformin.", "C"),
    ("medqa", MEDQA, "Therefore \\boxed{C}", "C"),
    ("medqa", MEDQA, "Therefore \\boxed{\\text{C}}", "C"),
    ("medqa", MEDQA, "Metformin", "C"),
    ("medqa", MEDQA, "I would start metformin.", "C"),
    ("medqa", MEDQA, "The answer is metformin.", "C"),
    ("medqa", MEDQA, "The answer is Metformin (C).", "C"),
    ("medqa", MEDQA, "Pioglitazone causes fluid retention; glipizide causes hypoglycemia. Answer: C", "C"),
    ("medqa", MEDQA, "The answer is B. No, actually the answer is C.", "C"),
    # ordinary words starting with A must not read as option A
    ("medqa", MEDQA, "A patient like this needs metformin, so the answer is C.", "C"),
    ("medqa", MEDQA, "A 54-year-old man should receive lifestyle advice.", None),
    ("medqa", MEDQA, "As a first step, Metformin is preferred.", "C"),
    ("medqa", MEDQA, "The answer is a drug that lowers hepatic glucose output.", None),
    # walks through the options: only an explicit statement counts
    ("medqa", MEDQA, "Consider each option.\nA. Insulin glargine: not first line.\nB. Glipizide: hypoglycemia.\n"
                     "C. Metformin: first line.\nD. Pioglitazone: edema.", None),
    ("medqa", MEDQA, "- **A. Insulin glargine**: no\n- **C. Metformin**: first line\n- **D. Pioglitazone**: edema", None),
    ("medqa", MEDQA, "- **A. Insulin glargine**: no\n- **C. Metformin**: first line\n\n**Answer: C**", "C"),
    ("medqa", MEDQA, "A. no\nB. no\nSo the answer is Metformin.", "C"),
    ("medqa", MEDQA, "The answer is B? Let me reconsider the renal function. \\boxed{C}", "C"),
    ("medqa", MEDQA, "Answer: B.\nHmm, no: (C) is the correct answer.", "C"),
    ("medqa", MEDQA, "Sulfonylureas risk hypoglycemia and insulin is not needed yet. " * 5 + "\n\nC. Metformin", "C"),
    # wrong letters and no answer
    ("medqa", MEDQA, "Answer: B", "B"),
    ("medqa", MEDQA, "The answer is (D)", "D"),
    ("medqa", MEDQA, "I think it's C, no wait, the answer is B.", "B"),
    ("medqa", MEDQA, "Glipizide", "B"),
    ("medqa", MEDQA, "Answer: E", None),            # not an option of this question
    ("medqa", MEDQA, "I don't know.", None),
    ("medqa", MEDQA, "", None),
    # other schemas: medmcqa (cop index), mmlu (answer index)
    ("medmcqa", MEDMCQA, "The answer is C", "C"),
    ("medmcqa", MEDMCQA, "Vitamin D is synthesised in the skin under UVB light.", "C"),
    ("medmcqa", MEDMCQA, "The answer is Vitamin C", "B"),   # the option's text names option B
    ("medmcqa", MEDMCQA, "Vitamin C is the correct answer.", "B"),
    ("mmlu-medical", MMLU, "The answer is Zygomatic bone.", "B"),
    ("mmlu-medical", MMLU, "<think>cheek bone</think><answer>B</answer>", "B"),
    ("mmlu-medical", MMLU, "<think>cheek bone</think><answer>Maxilla</answer>", "A"),
]


@pytest.mark.parametrize("bench,example,completion,expected", CHOICE_CASES)
def test_choice_scorer_verdicts(bench, example, completion, expected):
    b = E.BENCHES[bench]
    assert E.extract_choice(completion, b.options(example)) == expected
    gold = b.gold(example)
    assert E.score(bench, completion, example) == float(expected == gold)


def test_choice_case_count_and_gold_letters():
    assert len(CHOICE_CASES) >= 40
    assert sum(e == E.BENCHES[b].gold(x) for b, x, _, e in CHOICE_CASES) >= 20   # both verdicts well covered
    assert sum(e != E.BENCHES[b].gold(x) for b, x, _, e in CHOICE_CASES) >= 15
    assert E.BENCHES["medmcqa"].gold(MEDMCQA) == "C" and E.BENCHES["mmlu-medical"].gold(MMLU) == "B"
    listed = {"question": "q", "options": [{"key": "A", "value": "x"}, {"key": "B", "value": "y"}], "answer_idx": "B"}
    assert E.BENCHES["medqa"].options(listed) == {"A": "x", "B": "y"}   # the list-of-pairs mirror
    with pytest.raises(ValueError, match="cop"):
        E.BENCHES["medmcqa"].gold(dict(MEDMCQA, cop=-1))                # medmcqa's unlabeled test split


# ----------------------------------------------------------------------------------------------
# Hostile completions: bounded time, nothing executed, nothing logged

def test_hostile_completions_score_zero_in_bounded_time(tmp_path, capfd, caplog):
    target = tmp_path / "pwned"
    code = f"__import__('os').system('touch {target}')"
    hostile = [
        f"The answer is \\boxed{{{code}}}",
        f"\\boxed{{{code.replace('__import__', 'eval')}}}",
        "Clearly \\boxed{2^{2^{2^{2^{2^{100}}}}}}",
        "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
        "\\boxed{" + "+".join(["x"] * 20000) + "}",
        "\\boxed{2^{9999999999}}",
        "\\boxed{123456!}",
        "So the answer is " + "9" * 5000,
    ]
    t0 = time.time()
    rewards, counters = E.score_batch("math500", hostile, [ex("5")] * len(hostile))
    assert rewards == [0.0] * len(hostile)
    assert time.time() - t0 < 30                        # a safety bound, not a speed benchmark
    assert counters["filtered"] >= 6
    # The same strings straight into math-verify (no pre-filter) execute nothing either.
    assert E._VERIFIER.verify("\\boxed{5}", "\\boxed{" + code + "}", 10.0) is False
    assert not target.exists()
    out, err = capfd.readouterr()
    assert "__import__" not in out + err + caplog.text and "x+x+x" not in out + err + caplog.text


def test_timeout_is_counted_not_logged_and_the_worker_restarts(monkeypatch, capfd, caplog):
    monkeypatch.setattr(E, "hostile_reason", lambda ans: None)   # let a slow answer reach sympy
    monkeypatch.setattr(E, "VERIFY_TIMEOUT_S", 0.5)
    slow = "\\boxed{" + "+".join(["x"] * 20000) + "}"
    t0 = time.time()
    rewards, counters = E.score_batch("math500", [slow, "\\boxed{0.5}"], [ex("5"), ex("\\frac12")])
    assert rewards == [0.0, 1.0] and counters["timeouts"] == 1   # the next call runs on a fresh worker
    assert time.time() - t0 < 30
    out, err = capfd.readouterr()
    assert "x+x+x" not in out + err + caplog.text


# ----------------------------------------------------------------------------------------------
# Scoring from threads and from worker processes

THREAD_CASES = [(f"The answer is \\boxed{{\\frac{{{k}}}{{2}}}}.", str(k / 2)) for k in range(1, 25)]


def _score_math_case(case):
    completion, gold = case
    return E.score("math500", completion, ex(gold))


def test_score_from_threads():
    with cf.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(_score_math_case, THREAD_CASES)) == [1.0] * len(THREAD_CASES)
    wrong = [(c, str(float(g) + 1)) for c, g in THREAD_CASES[:8]]
    with cf.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(_score_math_case, wrong)) == [0.0] * 8


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_score_from_worker_processes(method):
    E.score("math500", "\\boxed{0.50}", ex("\\frac12"))   # the parent's worker exists before a fork
    completions, golds = zip(*THREAD_CASES[:6])
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as pool:   # evaluate.score itself is sent
        assert list(pool.map(E.score, ["math500"] * 6, completions, map(ex, golds))) == [1.0] * 6
    assert E.score("math500", "\\boxed{0.25}", ex("\\frac14")) == 1.0   # the parent's still works


# ----------------------------------------------------------------------------------------------
# Metrics

def pass_at_k_brute(n, c, k):
    """Fraction of the k-subsets of n samples (c correct) holding at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_by_hand():
    assert E.pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert E.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)       # 1 - C(3,2)/C(5,2)
    assert E.pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)       # 1 - C(3,3)/C(5,3)
    assert E.pass_at_k(5, 2, 4) == 1.0 and E.pass_at_k(5, 0, 5) == 0.0
    with pytest.raises(ValueError, match="pass_at_k"):
        E.pass_at_k(4, 5, 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_enumeration(nck):
    n, c, k = nck
    assert E.pass_at_k(n, c, k) == pytest.approx(pass_at_k_brute(n, c, k))
    assert E.pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_majority_and_summary_by_hand():
    assert E.majority_correct(["5", "4", "5", None], [True, False, True, False]) == 1.0
    assert E.majority_correct(["4", "5", "5", "4"], [False, True, True, False]) == 0.0   # tie: first seen
    assert E.majority_correct(["\\dfrac{1}{2}", "\\frac{1}{2}", "3"], [True, True, False]) == 1.0
    assert E.majority_correct([None, None], [False, False]) == 0.0
    rows = [dict(correct=[True, False], extracted=["1", "2"], status=["ok", "ok"], truncated=[False, True],
                 response_tokens=[3, 5]),
            dict(correct=[False, False], extracted=[None, "7"], status=["no_answer", "timeout"],
                 truncated=[False, False], response_tokens=[2, 2])]
    m = E.summarize(rows, 2)
    assert m["accuracy"] == m["mean@2"] == pytest.approx(0.25)
    assert m["pass@1"] == pytest.approx(0.25) and m["pass@2"] == pytest.approx(0.5)
    assert m["maj@2"] == pytest.approx(0.5)
    assert (m["timeouts"], m["no_answer"], m["truncated_frac"], m["mean_response_tokens"]) == (1, 1, 0.25, 3.0)


# ----------------------------------------------------------------------------------------------
# Synthetic tasks

@pytest.mark.parametrize("bench", ["add", "chain"])
def test_synthetic_deterministic_disjoint_and_self_consistent(bench):
    train = E.load_examples(bench, "train", limit=2000, seed=0)
    test = E.load_examples(bench, "test", limit=200, seed=0)
    assert train == E.load_examples(bench, "train", limit=2000, seed=0)
    assert E.load_examples(bench, "test", limit=200, seed=1) != test
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert len({r["question"] for r in test}) == len(test)
    for r in train[:200] + test:
        terms = [int(t) for t in r["question"].rstrip("=").split("+")]
        assert int(r["answer"]) == sum(terms)
        assert E.score(bench, r["solution"], r) == 1.0               # the target completion is correct
        assert E.score(bench, str(sum(terms) + 1), r) == 0.0
        assert E.prompt_ids(bench, r, rollout.build_tiny_tokenizer()) is not None


def test_synthetic_formats_and_integer_scorer():
    tok = rollout.build_tiny_tokenizer()
    row = {"question": "12+34+56+7=", "answer": "109"}
    assert E._chain_solution([12, 34, 56, 7]) == "12+34=46;46+56=102;102+7=109"
    assert tok.decode(E.prompt_ids("chain", row, tok)) == "12+34+56+7="   # raw text, no chat template
    add = {"question": "12+34=", "answer": "46"}
    for completion, expected in [("46", 1), (" 46", 1), ("46<junk", 1), ("47", 0), ("460", 0), ("", 0),
                                 ("12+34=46", 1), ("12+34=46;46+56=102;102+7=109", 0), ("x=46", 1), ("=-46", 0)]:
        assert E.score("add", completion, add) == expected, completion
    assert E.score("chain", "12+34=46;46+56=102;102+7=109", row) == 1.0
    assert E.score("chain", "12+34=46;46+56=102;102+7=108", row) == 0.0
    assert E.score("add", "9" * 5000, add) == 0.0        # an absurd number is not parsed past 100 digits
    with pytest.raises(ValueError, match="limit"):
        E.load_examples("add", "test", limit=5000)


# ----------------------------------------------------------------------------------------------
# Loading and prompts

@pytest.mark.parametrize("bench", list(FIXTURES))
def test_load_fixture_schemas(bench):
    rows = E.load_examples(bench, data=str(DATA / FIXTURES[bench]))
    assert len(rows) == (3 if bench != "math" else 4)    # mmlu: the astronomy row is not medical
    b = E.BENCHES[bench]
    for r in rows:
        gold = b.gold(r)
        assert gold and isinstance(gold, str)
        if b.scorer == "choice":
            assert gold in b.options(r)
            assert E.score(bench, f"<think>x</think><answer>{gold}</answer>", r) == 1.0
        else:
            assert E.score(bench, f"So the answer is \\boxed{{{gold}}}.", r) == 1.0


def test_load_limit_shuffle_and_errors():
    path = str(DATA / "math.jsonl")
    rows = E.read_rows(path)
    assert E.load_examples("math500", data=str(DATA / "math500.json"), limit=2) == E.read_rows(str(DATA / "math500.json"))[:2]
    drawn = E.load_examples("math", data=path, limit=4, seed=3)            # MATH is drawn at random
    assert sorted(map(json.dumps, drawn)) == sorted(map(json.dumps, rows))
    assert drawn == E.load_examples("math", data=path, limit=4, seed=3)
    with pytest.raises(ValueError, match="bench 'nope'"):
        E.load_examples("nope")
    with pytest.raises(ValueError, match="split 'train'"):
        E.load_examples("math500", "train")
    with pytest.raises(ValueError, match="--data"):
        E.load_examples("medqa", data="/no/such/file.jsonl")
    with pytest.raises(ValueError, match="fields"):
        E.load_examples("medqa", data=str(DATA / "math500.json"))         # wrong schema, found at once


def test_hub_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        E.load_examples("medqa")
    assert "--data PATH" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    assert time.time() - t0 < 20
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(E, "_hub_reachable", lambda timeout=3.0: False)   # as on a machine with no network
    with pytest.raises(SystemExit, match="unreachable.*--data PATH"):
        E.load_examples("math")


def test_prompts(tiny_tokenizer):
    math_row = E.read_rows(str(DATA / "math.jsonl"))[0]
    text = tiny_tokenizer.decode(E.prompt_ids("math", math_row, tiny_tokenizer))
    assert text.endswith(math_row["problem"] + " " + E.MATH_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
    msgs = E.messages("medqa", E.read_rows(str(DATA / "medqa.jsonl"))[0])
    assert msgs[0] == {"role": "system", "content": E.CHOICE_SYSTEM} and "<answer>" in msgs[0]["content"]
    assert msgs[1]["content"].endswith("\nA. Insulin glargine\nB. Glipizide\nC. Metformin\nD. Pioglitazone")
    tok = rollout.build_tiny_tokenizer()   # a template with Qwen3's thinking switch
    tok.chat_template = rollout.CHAT_TEMPLATE + ("{% if add_generation_prompt and enable_thinking is defined and "
                                                 "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}")
    off = tok.decode(E.prompt_ids("math500", {"problem": "1+1?", "answer": "2"}, tok))
    on = tok.decode(E.prompt_ids("math500", {"problem": "1+1?", "answer": "2"}, tok, thinking=True))
    assert off.endswith("assistant\n<think>\n\n</think>\n\n") and on.endswith("assistant\n")


# ----------------------------------------------------------------------------------------------
# evaluate() with a scripted sampler: the metrics through the whole pipeline, by hand

def test_evaluate_metrics_with_scripted_sampler(monkeypatch, tiny_model, tiny_tokenizer):
    examples = [{"question": "12+34=", "answer": "46"}, {"question": "50+50=", "answer": "100"}]
    script = {"12+34=": ["46", "47", "46"], "50+50=": ["1", "2", "3"]}   # c = 2 of 3, and 0 of 3
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id

    def fake_sample(model, prompts, group_size, cfg, *, eos_token_ids, pad_token_id, seed=0):
        texts = [t for q in prompts for t in script[tiny_tokenizer.decode(q)]]
        assert group_size == 3 and cfg.temperature == 1.0 and cfg.top_k == 0 and eos in eos_token_ids
        ids = [tiny_tokenizer.encode(t, add_special_tokens=False) + [eos] for t in texts]
        T = max(map(len, ids))
        response_ids = torch.tensor([r + [pad] * (T - len(r)) for r in ids])
        return types.SimpleNamespace(response_ids=response_ids, response_mask=response_ids != pad,
                                     finished=torch.ones(len(ids), dtype=torch.bool))

    monkeypatch.setattr(rollout, "sample", fake_sample)
    summary, rows = E.evaluate(tiny_model, tiny_tokenizer, "add", examples, n=3, temperature=1.0,
                               batch_size=1, progress=False)
    assert summary["accuracy"] == summary["mean@3"] == pytest.approx((2 / 3 + 0) / 2)
    assert summary["pass@1"] == pytest.approx(1 / 3)
    assert summary["pass@2"] == pytest.approx((1 - math.comb(1, 2) / math.comb(3, 2)) / 2)
    assert summary["pass@3"] == pytest.approx(0.5) and summary["maj@3"] == pytest.approx(0.5)
    assert rows[0]["completions"] == ["46", "47", "46"] and rows[0]["correct"] == [True, False, True]
    assert rows[0]["extracted"] == ["46", "47", "46"] and rows[1]["gold"] == "100"
    assert rows[0]["prompt"] == "12+34=" and summary["truncated_frac"] == 0.0
    with pytest.raises(ValueError, match="temperature"):
        E.evaluate(tiny_model, tiny_tokenizer, "add", examples, n=2, temperature=0.0)


# ----------------------------------------------------------------------------------------------
# The command end to end on the tiny offline model

def _check_outputs(out, bench, examples, n):
    summary = json.loads((Path(out) / f"{bench}.json").read_text())
    rows = [json.loads(line) for line in (Path(out) / f"{bench}.jsonl").read_text().splitlines()]
    assert summary["bench"] == bench and summary["examples"] == len(rows) == len(examples)
    assert [r["index"] for r in rows] == list(range(len(examples)))
    for r, example in zip(rows, examples):
        assert len(r["completions"]) == len(r["correct"]) == len(r["extracted"]) == n
        assert r["gold"] == E.BENCHES[bench].gold(example) and r["prompt"]
        assert r["correct"] == [E.score(bench, c, example) == 1.0 for c in r["completions"]]
    assert summary["accuracy"] == pytest.approx(sum(sum(r["correct"]) for r in rows) / (n * len(rows)))
    return summary, rows


@pytest.mark.parametrize("bench", list(FIXTURES))
def test_command_on_each_benchmark_schema(bench, tiny_model_dir, tmp_path):
    data = str(DATA / FIXTURES[bench])
    results = E.main(["--bench", bench, "--model", tiny_model_dir, "--data", data, "--max-new-tokens", "12",
                      "--batch-size", "2", "--out", str(tmp_path), "--no-progress"])
    summary, rows = _check_outputs(tmp_path, bench, E.load_examples(bench, data=data), 1)
    assert results[bench]["accuracy"] == summary["accuracy"] and summary["data"] == data
    assert rows[0]["prompt"].startswith("<|im_start|>")   # the chat template was applied


def test_command_sampling_metrics(tmp_path):
    E.main(["--bench", "add", "--model", "tiny", "--limit", "5", "--n", "4", "--temperature", "1.0",
            "--max-new-tokens", "6", "--out", str(tmp_path), "--no-progress"])
    summary, rows = _check_outputs(tmp_path, "add", E.load_examples("add", limit=5), 4)
    for k in (1, 2, 4):
        want = sum(E.pass_at_k(4, sum(r["correct"]), k) for r in rows) / len(rows)
        assert summary[f"pass@{k}"] == pytest.approx(want)
    assert {"mean@4", "maj@4"} <= set(summary)


def test_command_arguments():
    parser = E.build_parser()
    assert all(a.help for a in parser._actions)                       # every field has its docstring
    args = E.parse_args(["--bench", "math,medqa", "--limit", "3", "--thinking"])
    assert args.limit == 3 and args.thinking and args.data is None and args.n == 1
    for argv, match in [(["--bench", "nope"], "bench"), (["--n", "4"], "--n 4"), (["--limit", "0"], "--limit"),
                        (["--data", "/no/file.json"], "--data"), (["--bench", "math500", "--split", "train"], "--split"),
                        (["--dtype", "int8"], "--dtype")]:
        with pytest.raises(ValueError, match=match):
            E.parse_args(argv)


def test_command_as_subprocess_and_under_torchrun(tmp_path):
    """The real command line as 2 torchrun ranks (gloo) gives the rows of one process; a hub
    benchmark offline fails at once with advice and no traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    argv = ["evaluate.py", "--bench", "add", "--model", "tiny", "--limit", "6", "--max-new-tokens", "5",
            "--batch-size", "2", "--no-progress"]
    E.main(argv[1:] + ["--out", str(tmp_path / "one")])
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               *argv, "--out", str(tmp_path / "two")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    examples = E.load_examples("add", limit=6)
    one, rows1 = _check_outputs(tmp_path / "one", "add", examples, 1)
    two, rows2 = _check_outputs(tmp_path / "two", "add", examples, 1)
    assert rows1 == rows2 and one["accuracy"] == two["accuracy"]
    bad = subprocess.run([sys.executable, "evaluate.py", "--bench", "medqa", "--model", "tiny"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--data PATH" in bad.stderr and "Traceback" not in bad.stderr


def test_hostile_prefilter_by_hand():
    for ans, reason in [("2^{2^{2^{2^{2^{100}}}}}", "exponent tower"), ("2^2^2^2", "exponent tower"),
                        ("10^{1000000}", "huge exponent"), ("123456!", "huge factorial"),
                        ("(" * 31 + ")" * 31, "nesting"), ("1+" * 300 + "1", "length"),
                        ("x.__class__", "dunder")]:
        assert E.hostile_reason(ans) == reason, ans
    for ans in ["e^{x^2}", "2^{10}", "10^{100}", "x^{2}+y^{2}", "\\frac{\\sqrt{3}}{2}", "5!", "((1+2)\\cdot3)"]:
        assert E.hostile_reason(ans) is None, ans
