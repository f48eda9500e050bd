"""evaluate.py: scorers on real-looking completions, hostile inputs, metrics by hand, loading, the command.

Layers: hand-labelled completions (math and multiple choice; every option text of tricky rows); hostile
completions (nothing executed, nothing logged; degenerate outputs that made a backtracking scorer hang,
under an alarm, and the same a hundred times longer with the length cap lifted); last_boxed against a
readable rescan on random inputs; scoring from threads and worker processes; pass@k against brute-force
enumeration; synthetic generators; loading every fixture schema, both MedMCQA cop codings, MMLU's CSV
forms, and a bad file or row named by file and line; evaluate() with a scripted sampler (metrics by hand)
and with any batch size (the same samples); the command end to end on the tiny offline model (in process,
as a subprocess, and under torchrun with 2 ranks), and every bad flag reported before a model loads.
"""
import concurrent.futures as cf
import contextlib
import inspect
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import signal
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
    seventy_thirds = {"input": "q", "target": 23.333333333333332}
    assert E.score("gsm-hard", "The answer is \\boxed{\\frac{70}{3}}", seventy_thirds) == 1.0
    assert E.score("amc23", "\\boxed{7}", {"question": "q", "answer": 7.0}) == 1.0


def test_last_boxed_nesting_and_escapes():
    assert E.last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert E.last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert E.last_boxed("\\boxed{1} and \\boxed{2") == "1"                 # an unclosed last box is skipped
    assert E.last_boxed("no box") is None


def test_gold_numbers_list_answers_and_gsm_hard_tolerance():
    """AMC23's list form gives the number, not "['27.0']"; GSM-HARD's float targets take plain numbers within
    1e-3 (its authors' check), integers exactly, and other forms through math-verify."""
    amc = {"question": "q", "answer": ["27.0"]}
    assert E.BENCHES["amc23"].gold(amc) == "27" and E.score("amc23", "So \\boxed{27}.", amc) == 1.0
    assert E.BENCHES["amc23"].gold({"question": "q", "answer": "27.0"}) == "27"
    with pytest.raises(ValueError, match="exactly one"):
        E.BENCHES["amc23"].gold({"question": "q", "answer": ["27.0", "28.0"]})
    third = {"input": "q", "target": 14053029.666666666}
    for answer, expected in [("\\boxed{14053029.667}", 1), ("\\boxed{14,053,029.6667}", 1),
                             ("The answer is 14053029.6666", 1), ("\\boxed{\\frac{42159089}{3}}", 1),
                             ("\\boxed{14053029.67}", 0), ("\\boxed{14053030}", 0), ("\\boxed{14053029}", 0)]:
        assert E.score("gsm-hard", answer, third) == expected, answer
    whole = {"input": "q", "target": 3737022.0}
    assert [E.score("gsm-hard", f"\\boxed{{{a}}}", whole) for a in ("3737022", "\\$3,737,022", "3737023")] == [1, 1, 0]
    assert E.score("gsm-hard", "\\boxed{3244047.1}", {"input": "q", "target": 3244047.0999999996}) == 1.0
    assert E.score("math500", "\\boxed{0.3334}", ex("0.3333")) == 0.0         # no tolerance outside GSM-HARD


# ----------------------------------------------------------------------------------------------
# Multiple-choice scorer

MEDQA = {"question": "A 54-year-old man with type 2 diabetes ... most appropriate initial medication?",
         "options": {"A": "Insulin glargine", "B": "Glipizide", "C": "Metformin", "D": "Pioglitazone"},
         "answer_idx": "C", "answer": "Metformin"}
MEDMCQA = {"question": "Which vitamin is synthesised in the skin?", "opa": "Vitamin A", "opb": "Vitamin C",
           "opc": "Vitamin D", "opd": "Vitamin K", "cop": 2}
MMLU = {"question": "Which bone forms the prominence of the cheek?", "subject": "anatomy",
        "choices": ["Maxilla", "Zygomatic bone", "Nasal bone", "Sphenoid bone"], "answer": 1}

PRELOAD = {"question": "Which change shortens ...?", "answer_idx": "B",   # option texts opening with "A"
           "options": {"A": "Increased preload", "B": "A reduction in diastolic filling time",
                       "C": "Decreased afterload",
                       "D": "A drop in systolic blood pressure of 14 mmHg during inspiration"}}

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
    ("medqa", MEDQA, "- **A. Insulin glargine**: no\n- **C. Metformin**: first line\n- **D. Pioglitazone**: edema",
     None),
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
    # an option's text that starts with a capital letter is that option, not the letter (PRELOAD's gold is B)
    ("medqa", PRELOAD, "The answer is A reduction in diastolic filling time.", "B"),
    ("medqa", PRELOAD, "Answer: A reduction in diastolic filling time", "B"),
    ("medqa", PRELOAD, "The answer is A drop in systolic blood pressure of 14 mmHg during inspiration", "D"),
    ("medqa", PRELOAD, "The answer is A. Increased preload", "A"),            # the letter, stated as one
    ("medqa", PRELOAD, "The answer is A because preload rises.", "A"),
    ("medqa", PRELOAD, "The answer is B reduction", "B"),
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


TRICKY_OPTIONS = [   # option texts that collided, or read as a letter, before text matching kept symbols
    {"A": "Rh+ve", "B": "Rh-ve", "C": "Rh null", "D": "Bombay phenotype"},
    {"A": "α2 agonist", "B": "β2 agonist", "C": "β1 blocker", "D": "α1 blocker"},
    {"A": "A alpha", "B": "A delta", "C": "B fibers", "D": "C fibers"},
    {"A": "↑ PTH, ↓ calcium", "B": "↓ PTH, ↑ calcium", "C": "↑ PTH, ↑ calcium", "D": "Normal PTH"},
    {"A": "IL-2", "B": "IL-10", "C": "IL-13", "D": "TNF-α"},
    {"A": "Gram (+)ve cocci", "B": "Gram (–)ve cocci", "C": "Gram (+)ve bacilli", "D": "Gram (–)ve bacilli"},
    PRELOAD["options"], MEDQA["options"],
]
TEXT_FORMS = ["The answer is {t}", "The answer is {t}.", "the answer is {t}", "Answer: {t}", "**Answer:** {t}",
              "<think>x</think><answer>{t}</answer>", "{t}", "So the final answer is: {t}"]


@pytest.mark.parametrize("options", TRICKY_OPTIONS)
def test_an_options_text_names_that_option_only(options):
    """Every option's text, stated in each usual form, picks that option and no other (whatever the gold is)."""
    for gold in options:
        row = {"question": "q", "options": options, "answer_idx": gold}
        for form, (letter, text) in itertools.product(TEXT_FORMS, options.items()):
            assert E.score("medqa", form.format(t=text), row) == float(letter == gold), (form, text, gold)


# ----------------------------------------------------------------------------------------------
# Hostile completions: bounded time, nothing executed, nothing logged

def test_hostile_completions_score_zero_in_bounded_time(tmp_path, capfd, caplog, monkeypatch):
    monkeypatch.setattr(E, "MAX_SCORED_CHARS", 10 ** 6)   # the long answers below must reach the filter, not the cap
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
    monkeypatch.setattr(E, "MAX_SCORED_CHARS", 10 ** 6)
    monkeypatch.setattr(E, "VERIFY_TIMEOUT_S", 0.5)
    slow = "\\boxed{" + "+".join(["x"] * 20000) + "}"
    t0 = time.time()
    rewards, counters = E.score_batch("math500", [slow, "\\boxed{0.5}"], [ex("5"), ex("\\frac12")])
    assert rewards == [0.0, 1.0] and counters["timeouts"] == 1   # the next call runs on a fresh worker
    assert time.time() - t0 < 30
    out, err = capfd.readouterr()
    assert "x+x+x" not in out + err + caplog.text


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging when the block runs past `seconds` (SIGALRM; the regex engine checks signals).
    A guard against super-linear scans, set tens of times above what a linear scan needs: not a timing."""
    def expire(*_):
        raise TimeoutError(f"still scanning after {seconds} s: a super-linear path")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


HOSTILE_SCANS = [  # (bench, completion): each took over 30 s (some hours) on the backtracking scorer
    ("medqa", "Answer" + " " * 100 + "!"),
    ("medqa", "My final answer" + "\n" * 120 + "(see the reasoning above)"),
    ("medqa", "The answer is:" + " " * 400 + "?"),
    ("medqa", "**Answer:**" + " \n" * 20_000 + "?"),
    ("medqa", "The correct option is" + " " * 3000 + "!"),
    ("medqa", "<answer>" * 40_000),                                   # unclosed tags: each rescanned the rest
    ("math500", "\\boxed{" * 40_000),                                   # unclosed boxes: each rescanned the rest
    ("math500", "the answer is" + "\n" * 50_000),
    ("math500", "Final answer:" + "\n" * 50_000),
]


@pytest.mark.parametrize("bench,completion", HOSTILE_SCANS)
def test_degenerate_completions_score_zero_without_backtracking(bench, completion):
    example = MEDQA if bench == "medqa" else ex("5")
    with deadline(60):
        assert E.score(bench, completion, example) == 0.0


def test_scans_are_linear_even_without_the_length_cap(monkeypatch):
    """With the cap lifted, inputs a hundred times longer still finish: the patterns cannot backtrack and
    last_boxed matches braces in one pass."""
    monkeypatch.setattr(E, "MAX_SCORED_CHARS", 10 ** 8)
    options = MEDQA["options"]
    with deadline(120):
        for _, completion in HOSTILE_SCANS:
            long = completion * (200_000 // len(completion) + 1)
            assert E.extract_choice(long, options) in (None, *options)
            E.extract_math_answer(long)
        assert E.last_boxed("\\boxed{" * 400_000) is None
        assert E.last_boxed("\\boxed{" * 400_000 + "\\boxed{7}") == "7"
        assert E.extract_choice("Answer" + " " * 1_000_000 + "C", options) == "C"


def test_only_the_end_of_a_long_completion_is_read():
    filler = "Let me think about this again. " * 500            # longer than MAX_SCORED_CHARS
    assert len(filler) > E.MAX_SCORED_CHARS
    assert E.extract_choice(filler + "The answer is C.", MEDQA["options"]) == "C"
    assert E.extract_choice("The answer is C." + filler, MEDQA["options"]) is None   # the statement is cut off
    assert E.score("math500", filler + "\\boxed{5}", ex("5")) == 1.0
    assert E.score("math500", "<think>" + filler + "\\boxed{5}", ex("5")) == 0.0     # an unclosed think, seen whole
    assert E.score("add", "9" * 10_000 + "=46", {"question": "12+34=", "answer": "46"}) == 1.0


def last_boxed_readable(text):
    """The scorer's definition, by rescanning from each box: the last box (by start) that closes, or the
    token after `\\boxed `. Quadratic, for comparison only."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\b\s*", text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "\\":
                    j += 2
                    continue
                depth += (text[j] == "{") - (text[j] == "}")
                if depth == 0:
                    return text[i + 1:j].strip()
                j += 1
        elif m.group(0).endswith(" ") and (tok := re.match(r"[^\s$]+", text[i:])):
            return tok.group(0)
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["\\boxed", "\\fbox", "{", "}", "\\", " ", "x", "1", "\\{", "\\}", "$"]), max_size=30))
def test_last_boxed_matches_the_readable_rescan(parts):
    text = "".join(parts)
    assert E.last_boxed(text) == last_boxed_readable(text)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["answer", "Answer", " is", ":", " ", "\n", "*", "**", "(", ")", "C", "A", "option",
                                 "\\boxed{", "}", "<answer>", "</answer>", "</think>", "=", "-", "$", "c", "."]),
                min_size=1, max_size=20), st.integers(1, 3000))
def test_random_degenerate_completions_finish(parts, repeat):
    text = "".join(parts) * repeat
    with deadline(60):
        E.extract_choice(text, MEDQA["options"])
        E.extract_math_answer(text)


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
    math500 = str(DATA / "math500.json")
    assert E.load_examples("math500", data=math500, limit=2) == E.read_rows(math500)[:2]
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


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def medmcqa_rows(cops):
    return [{"question": f"q{i}", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": c} for i, c in enumerate(cops)]


def test_medmcqa_cop_codings(tmp_path, capsys):
    """The hub's 0-3 and the original release's 1-4 give the same golds; a file that fits both is refused."""
    zero = E.load_examples("medmcqa", data=write_jsonl(tmp_path / "zero.jsonl", medmcqa_rows([0, 3, 1, 2, 0])))
    assert [E.BENCHES["medmcqa"].gold(r) for r in zero] == ["A", "D", "B", "C", "A"]
    assert "note" not in capsys.readouterr().err
    one = E.load_examples("medmcqa", data=write_jsonl(tmp_path / "one.jsonl", medmcqa_rows([1, 4, 2, 3, 1])))
    assert [E.BENCHES["medmcqa"].gold(r) for r in one] == ["A", "D", "B", "C", "A"]
    assert "1..4" in capsys.readouterr().err                               # the conversion is said, once
    assert E.score("medmcqa", "The answer is D", one[1]) == 1.0
    with pytest.raises(ValueError, match=r"one\.jsonl.*1\.\.3.*letter"):       # fits both codings
        E.load_examples("medmcqa", data=write_jsonl(tmp_path / "one.jsonl", medmcqa_rows([1, 2, 3, 2])))
    with pytest.raises(ValueError, match=r"mixed\.jsonl: line 3: cop 4 in a file that also has cop 0"):
        E.load_examples("medmcqa", data=write_jsonl(tmp_path / "mixed.jsonl", medmcqa_rows([0, 1, 4])))
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 4: field 'cop': 7"):     # checked on every row, at load
        E.load_examples("medmcqa", data=write_jsonl(tmp_path / "bad.jsonl", medmcqa_rows([0, 1, 2, 7, 3])))
    letters = E.load_examples("medmcqa", data=write_jsonl(tmp_path / "letters.jsonl", medmcqa_rows(["b", "c"])))
    assert [E.BENCHES["medmcqa"].gold(r) for r in letters] == ["B", "C"]


MMLU_HEADER = "question,choice0,choice1,choice2,choice3,answer\n"
MMLU_CSV_ROWS = ['Which bone forms the cheek?,Maxilla,Zygomatic bone,Nasal bone,Sphenoid bone,1\n',
                 '"Which nerve, at the stylomastoid foramen?",Facial,Vagus,"Trigeminal, V3",Hypoglossal,0\n']


def test_mmlu_csv_forms_and_subjects(tmp_path):
    """MMLU's two CSV forms: a header with choice0..3 and an index answer, and Hendrycks' header-less files
    with letter answers; the subject comes from the column or the file name (SUBJECT_test.csv)."""
    (tmp_path / "anatomy_test.csv").write_text(MMLU_HEADER + "".join(MMLU_CSV_ROWS))
    rows = E.load_examples("mmlu-medical", data=str(tmp_path / "anatomy_test.csv"))
    assert [r["subject"] for r in rows] == ["anatomy"] * 2 and rows[1]["choices"][2] == "Trigeminal, V3"
    assert [E.BENCHES["mmlu-medical"].gold(r) for r in rows] == ["B", "A"]
    (tmp_path / "college_medicine_test.csv").write_text("".join(r.rsplit(",", 1)[0] + ",C\n" for r in MMLU_CSV_ROWS))
    rows = E.load_examples("mmlu-medical", data=str(tmp_path / "college_medicine_test.csv"))
    assert [E.BENCHES["mmlu-medical"].gold(r) for r in rows] == ["C", "C"] and rows[0]["subject"] == "college_medicine"
    (tmp_path / "astronomy_test.csv").write_text(MMLU_HEADER + MMLU_CSV_ROWS[0])
    with pytest.raises(ValueError, match="no rows of the medical subjects"):
        E.load_examples("mmlu-medical", data=str(tmp_path / "astronomy_test.csv"))
    (tmp_path / "with_subject.csv").write_text("question,A,B,C,D,answer,subject\nq1,w,x,y,z,D,anatomy\n"
                                               "q2,w,x,y,z,A,astronomy\n")
    rows = E.load_examples("mmlu-medical", data=str(tmp_path / "with_subject.csv"))
    assert len(rows) == 1 and E.BENCHES["mmlu-medical"].gold(rows[0]) == "D"
    (tmp_path / "ragged_test.csv").write_text(MMLU_HEADER + MMLU_CSV_ROWS[0] + "q,a,b,1\n")
    with pytest.raises(ValueError, match=r"ragged_test\.csv: line 3: 4 columns"):
        E.load_examples("mmlu-medical", data=str(tmp_path / "ragged_test.csv"))
    with pytest.raises(ValueError, match="mmlu-medical only"):
        E.load_examples("medqa", data=str(tmp_path / "anatomy_test.csv"))


def test_mmlu_rows_without_a_subject_are_refused(tmp_path):
    """A whole-MMLU file without subjects cannot be kept to medicine: refused, not scored as medicine."""
    (tmp_path / "all.csv").write_text(MMLU_HEADER + "".join(MMLU_CSV_ROWS))
    with pytest.raises(ValueError, match=r"all\.csv: the file has no subject field.*SUBJECT_test\.csv"):
        E.load_examples("mmlu-medical", data=str(tmp_path / "all.csv"))
    rows = E.read_rows(str(DATA / "mmlu-medical.json"))
    write_jsonl(tmp_path / "partly.jsonl", rows[:1] + [{k: v for k, v in rows[1].items() if k != "subject"}])
    with pytest.raises(ValueError, match="lacks the subject field at line 2"):
        E.load_examples("mmlu-medical", data=str(tmp_path / "partly.jsonl"))
    write_jsonl(tmp_path / "one.jsonl", rows[:1])                    # one row: not mistaken for a list holder
    assert E.load_examples("mmlu-medical", data=str(tmp_path / "one.jsonl")) == rows[:1]


def test_data_file_errors_name_the_file_and_the_line(tmp_path):
    rows = E.read_rows(str(DATA / "medqa.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n\n" + '{"question": "q", "options": ' + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=r"--data .*bad\.jsonl: line 3 is not JSON"):
        E.load_examples("medqa", data=str(bad))
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(rows, indent=1).replace('"answer_idx": "C"', '"answer_idx": C', 1))
    with pytest.raises(ValueError, match=r"pretty\.json: not JSON: .* at line \d+"):
        E.load_examples("medqa", data=str(pretty))
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps(rows[0]).replace("diabetes", "diab\u00e8tes").encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"latin1\.jsonl: not UTF-8"):
        E.load_examples("medqa", data=str(latin))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(ValueError, match=r"garbage\.parquet: not a readable parquet file"):
        E.load_examples("medmcqa", data=str(garbage))
    write_jsonl(tmp_path / "third.jsonl", rows[:2] + [{k: v for k, v in rows[2].items() if k != "options"}])
    with pytest.raises(ValueError, match=r"third\.jsonl: line 3: .*'options'"):
        E.load_examples("medqa", data=str(tmp_path / "third.jsonl"), limit=1)   # checked even beyond --limit
    write_jsonl(tmp_path / "gold_e.jsonl", rows[:1] + [dict(rows[1], answer_idx="E")])
    with pytest.raises(ValueError, match=r"line 2: field 'answer_idx': 'E' is neither an option letter"):
        E.load_examples("medqa", data=str(tmp_path / "gold_e.jsonl"))
    with pytest.raises(ValueError, match=r"^--val-data .*bad\.jsonl: line 3"):   # train.py's validation file
        E.load_examples("medqa", data=str(bad), flag="--val-data")


def test_parquet_with_a_list_question_is_rejected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    good = {"problem": "What is 1+1?", "answer": "2"}
    pq.write_table(pa.Table.from_pylist([good, good]), tmp_path / "ok.parquet")
    assert len(E.load_examples("math500", data=str(tmp_path / "ok.parquet"))) == 2
    listed = {"problem": ["What is", "1+1?"], "answer": "2"}
    pq.write_table(pa.Table.from_pylist([listed, listed]), tmp_path / "list.parquet")
    with pytest.raises(ValueError, match=r"list\.parquet: row 1: field 'problem' must be non-empty text, got list"):
        E.load_examples("math500", data=str(tmp_path / "list.parquet"))


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

    def fake_sample(model, prompts, group_size, cfg, *, eos_token_ids, pad_token_id, seed=0, prompt_keys=None):
        texts = [t for q in prompts for t in script[tiny_tokenizer.decode(q)]]
        assert [examples[k]["question"] for k in prompt_keys] == [tiny_tokenizer.decode(q) for q in prompts]
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


def test_command_arguments(tmp_path):
    parser = E.build_parser()
    assert all(a.help for a in parser._actions)                       # every field has its docstring
    args = E.parse_args(["--bench", "math,medqa", "--limit", "3", "--thinking"])
    assert args.limit == 3 and args.thinking and args.data is None and args.n == 1
    # evaluate.py imports rollout lazily, so its page size is a literal: it must stay the sampler's default
    assert args.page_size == rollout.SamplingConfig.page_size == inspect.signature(E.evaluate).parameters[
        "page_size"].default
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv, match in [(["--bench", "nope"], "^--bench 'nope'"), (["--bench", "math,"], "^--bench ''"),
                        (["--n", "4"], "^--n 4"), (["--n", "0"], "^--n 0"), (["--limit", "0"], "^--limit 0"),
                        (["--batch-size", "0"], "^--batch-size 0"), (["--max-new-tokens", "0"], "^--max-new-tokens 0"),
                        (["--kv-budget", "0"], "^--kv-budget 0"), (["--page-size", "0"], "^--page-size 0"),
                        (["--temperature", "-1"], "^--temperature"), (["--temperature", "inf"], "^--temperature inf"),
                        (["--temperature", "nan"], "^--temperature nan"), (["--seed", "-1"], "^--seed -1"),
                        (["--data", "/no/file.json"], "^--data"),
                        (["--bench", "math,medqa", "--data", str(a_file)], "^--data"),
                        (["--bench", "math500", "--split", "train"], "^--split"), (["--dtype", "int8"], "^--dtype"),
                        (["--device", "gpu"], "^--device gpu"), (["--out", str(a_file)], "^--out .*is a file"),
                        (["--out", str(a_file / "sub")], "^--out .*is a file")]:
        with pytest.raises(ValueError, match=match):
            E.parse_args(argv)


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the bad argument was reported")


def test_command_reports_errors_before_loading_a_model(monkeypatch, tmp_path):
    """--device without such a GPU, an unwritable --out, a bad row: a message naming the flag, no model load."""
    monkeypatch.setattr(rollout, "load_model_and_tokenizer", refuse_to_load)
    with pytest.raises(ValueError, match=r"^--device cuda:99: this machine has \d+ CUDA device"):
        E.main(["--bench", "add", "--model", "tiny", "--limit", "2", "--device", "cuda:99", "--out", str(tmp_path)])
    def read_only(**kwargs):   # what a read-only disk answers (root ignores chmod, so it is simulated)
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(E.tempfile, "NamedTemporaryFile", read_only)
        with pytest.raises(ValueError, match=r"^--out .*ro: cannot write there \(Permission denied\)"):
            E.main(["--bench", "add", "--model", "tiny", "--limit", "2", "--out", str(tmp_path / "ro")])
    rows = E.read_rows(str(DATA / "medqa.jsonl"))
    write_jsonl(tmp_path / "third.jsonl", rows[:2] + [dict(rows[2], question=["not", "text"])])
    with pytest.raises(ValueError, match=r"^--data .*third\.jsonl: line 3: field 'question'"):
        E.main(["--bench", "medqa", "--model", "tiny", "--data", str(tmp_path / "third.jsonl"), "--out", str(tmp_path)])


def test_an_empty_model_directory_is_named_as_such(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^--model .*empty.*: not a saved model") as e:
        E.main(["--bench", "add", "--model", str(tmp_path / "empty"), "--limit", "2", "--out", str(tmp_path)])
    assert "sentencepiece" not in str(e.value)


def test_summary_is_printed_before_the_files_are_written(tmp_path, capsys):
    (tmp_path / "add.json").mkdir()                                 # the summary file cannot be written
    with pytest.raises(ValueError, match=r"^--out .*: could not write .*add\.json.*printed above"):
        E.main(["--bench", "add", "--model", "tiny", "--limit", "3", "--max-new-tokens", "4", "--out", str(tmp_path),
                "--no-progress"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["bench"] == "add" and printed["examples"] == 3


LONG_MEDQA = {"question": "A 67-year-old woman comes to the physician because of shortness of breath on exertion "
                          "and swelling of both ankles for three months. " * 12 + "What is the most likely cause?",
              "options": {"A": "Aortic stenosis", "B": "Mitral regurgitation", "C": "Constrictive pericarditis",
                          "D": "Restrictive cardiomyopathy"}, "answer_idx": "C"}


def test_long_prompts_fit_the_tiny_model_and_a_too_small_context_is_named(tmp_path, monkeypatch, tiny_model,
                                                                          tiny_tokenizer):
    """A MedQA-length prompt (as real rows are) runs on the tiny model; one that cannot fit the context with
    the response budget is refused before any generation, naming --max-new-tokens."""
    data = write_jsonl(tmp_path / "long.jsonl", [LONG_MEDQA, dict(LONG_MEDQA, answer_idx="A")])
    E.main(["--bench", "medqa", "--model", "tiny", "--data", data, "--max-new-tokens", "8", "--out", str(tmp_path),
            "--no-progress"])
    summary, rows = _check_outputs(tmp_path, "medqa", E.load_examples("medqa", data=data), 1)
    assert len(tiny_tokenizer.encode(rows[0]["prompt"])) > 1000
    monkeypatch.setattr(tiny_model.config, "max_position_embeddings", 1024)
    monkeypatch.setattr(rollout, "sample", refuse_to_load)
    with pytest.raises(ValueError, match=r"^--max-new-tokens 512: example 0's prompt has \d+ tokens.*context of 1024"):
        E.evaluate(tiny_model, tiny_tokenizer, "medqa", [LONG_MEDQA], max_new_tokens=512, progress=False)


def test_samples_do_not_depend_on_the_batch(tiny_model, tiny_tokenizer):
    """An example's samples are keyed by its index: any batch size (and any rank, below) gives the same ones."""
    examples = E.load_examples("add", limit=5)
    runs = [E.evaluate(tiny_model, tiny_tokenizer, "add", examples, n=3, temperature=1.0, max_new_tokens=6,
                       batch_size=size, progress=False)[1] for size in (1, 2, 5)]
    completions = [[r["completions"] for r in rows] for rows in runs]
    assert completions[0] == completions[1] == completions[2]
    assert len({c for r in runs[0] for c in r["completions"]}) > 3            # sampled, not all alike


def test_command_as_subprocess_and_under_torchrun(tmp_path):
    """The real command line as 2 torchrun ranks (gloo) samples what one process samples, at another batch
    size; a hub benchmark offline fails at once with advice; a bad flag is one line and exit code 2."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    argv = ["evaluate.py", "--bench", "add", "--model", "tiny", "--limit", "6", "--max-new-tokens", "5",
            "--n", "2", "--temperature", "1.0", "--no-progress"]
    E.main(argv[1:] + ["--batch-size", "4", "--out", str(tmp_path / "one")])
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "--", *argv, "--batch-size", "2", "--out", str(tmp_path / "two")],   # "--": see --n
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    examples = E.load_examples("add", limit=6)
    one, rows1 = _check_outputs(tmp_path / "one", "add", examples, 2)
    two, rows2 = _check_outputs(tmp_path / "two", "add", examples, 2)
    assert rows1 == rows2 and one["accuracy"] == two["accuracy"]
    bad = subprocess.run([sys.executable, "evaluate.py", "--bench", "medqa", "--model", "tiny"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--data PATH" in bad.stderr and "Traceback" not in bad.stderr
    for flags, named in [(["--temperature", "nan"], "--temperature"), (["--limit", "0"], "--limit"),
                         (["--out", str(ROOT / "evaluate.py")], "--out")]:
        run = subprocess.run([sys.executable, "evaluate.py", "--bench", "add", "--model", "tiny", *flags], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and run.stderr.startswith(f"evaluate.py: error: {named} "), run.stderr
        assert len(run.stderr.strip().splitlines()) == 1


def test_hostile_prefilter_by_hand():
    for ans, reason in [("2^{2^{2^{2^{2^{100}}}}}", "exponent tower"), ("2^2^2^2", "exponent tower"),
                        ("10^{1000000}", "huge exponent"), ("123456!", "huge factorial"),
                        ("(" * 31 + ")" * 31, "nesting"), ("1+" * 300 + "1", "length"),
                        ("x.__class__", "dunder")]:
        assert E.hostile_reason(ans) == reason, ans
    for ans in ["e^{x^2}", "2^{10}", "10^{100}", "x^{2}+y^{2}", "\\frac{\\sqrt{3}}{2}", "5!", "((1+2)\\cdot3)"]:
        assert E.hostile_reason(ans) is None, ans
