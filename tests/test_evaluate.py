"""evaluate.py: each test names the bug it would catch.

Scorers on hand-labelled completions and on hostile ones (bounded time, nothing executed, nothing logged);
metrics by hand and by enumeration; the synthetic tasks pinned; loading each benchmark's schema from a local
file, and a bad file or row named by file and line; evaluate() with a scripted sampler; the command end to end
on the tiny offline model. Distributed evaluation (2 gloo ranks equal to 1) is tested through train.py's
validation in test_train.py.
"""
import concurrent.futures as cf
import contextlib
import dataclasses as dc
import hashlib
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
            "medqa": "medqa.jsonl", "medmcqa": "medmcqa.parquet", "mmlu-medical": "mmlu-medical.json",
            "aime24": "aime24.jsonl", "aime25": "aime25.jsonl", "minerva": "minerva.jsonl",
            "olympiadbench": "olympiadbench.jsonl", "gsm8k": "gsm8k.jsonl", "omni-math": "omni-math.jsonl",
            "gpqa-diamond": "gpqa-diamond.csv"}   # small rows of each dataset's own schema, written for the tests
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def ex(answer):
    """A MATH-500 row with the given gold answer."""
    return {"problem": "p", "answer": answer}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (SIGALRM; the regex engine checks signals): a guard against super-linear scans set
    tens of times above what a linear scan needs, not a timing."""
    def expire(*_):
        raise TimeoutError(f"still scanning after {seconds} s: a super-linear path")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------------------------
# Math scorer

MATH_CASES = [  # (completion, gold, expected)
    ("So $x = \\frac{1}{2}$ and the answer is $\\boxed{\\frac{1}{2}}$.", "0.5", 1),
    ("Therefore the probability is \\boxed{\\dfrac{3}{4}}.", "\\frac{3}{4}", 1),
    ("Hence $\\boxed{-\\frac{1}{3}}$.", "-1/3", 1),
    ("Hence $\\boxed{\\frac{1}{3}}$.", "-\\frac13", 0),
    ("$\\sqrt{8} = \\boxed{2\\sqrt{2}}$", "\\sqrt{8}", 1),
    ("The sum is \\boxed{1,000,000}.", "1000000", 1),
    ("Approximately \\boxed{\\pi}", "3.14159", 0),
    ("Each side is \\boxed{10\\text{ cm}}.", "10", 1),
    ("The angle measures \\boxed{90^\\circ}.", "90", 1),
    ("The discount is \\boxed{5\\%}.", "5", 1),
    ("She paid \\boxed{\\$18.90}.", "18.90", 1),
    ("The winner is \\boxed{Evelyn}.", "\\text{Evelyn}", 1),
    ("The function is \\boxed{\\text{even}}.", "\\text{odd}", 0),
    ("The point is \\boxed{(3, 4)}.", "(3,4)", 1),
    ("The point is \\boxed{(4, 3)}.", "(3,4)", 0),
    ("The solution set is \\boxed{[1, 2)}.", "[1,2)", 1),
    ("The solution set is \\boxed{(1, 2)}.", "[1,2)", 0),
    ("So \\boxed{x = 6}.", "6", 1),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 1),
    ("\\boxed{7}", "6", 0),
    ("The answer is \\fbox{6}.", "6", 1),
    ("The answer is $\\boxed 6$.", "6", 1),
    ("First I got \\boxed{3}, but correcting the sign error gives \\boxed{5}.", "5", 1),   # the last box counts
    ("\\boxed{5} ... wait, let me recheck: \\boxed{3}", "5", 0),
    ("The final answer is $\\frac{7}{8}$.", "\\frac{7}{8}", 1),                         # the fallbacks
    ("She has 3 apples, buys 5 more, so 8 in total", "8", 1),
    ("The total is 8, not 9", "8", 0),
    ("I am not sure how to solve this.", "5", 0),
    ("\\boxed{}", "5", 0),
    ("<think>Maybe \\boxed{4}? No.</think>The answer is \\boxed{5}.", "5", 1),            # only after </think>
    ("<think>It is \\boxed{5}.</think>\n\\boxed{4}", "5", 0),
    ("<think>Adding up, we get 5, so \\boxed{5}", "5", 0),                                # unclosed: no answer
]


@pytest.mark.parametrize("completion,gold,expected", MATH_CASES)
def test_math_scorer_verdicts(completion, gold, expected):
    """Catches a wrong verdict on the forms MATH answers take (units, %, \\text, intervals, matrices), an earlier box
    or one inside <think> taken for the answer, and a fallback that finds an answer where there is none."""
    assert E.score("math500", completion, ex(gold)) == expected


def test_gold_answers_read_from_the_right_place():
    """Catches a gold read from the wrong place: MATH's is its solution's last box, AMC23's 27.0 or ["27.0"] is
    27, GSM8K's the "#### N" line of its worked solution, OmniMATH's a box inside \\[...\\]; and GSM-HARD's float
    target takes a plain number within 1e-3 (absolute: its authors' check), no closer."""
    row = {"problem": "p", "solution": "First $\\boxed{x}$ is a variable; then $y = \\boxed{\\frac{7}{8}}$."}
    assert E.BENCHES["math"].gold(row) == "\\frac{7}{8}" and E.score("math", "So \\boxed{0.875}.", row) == 1.0
    for answer in (27.0, "27.0", ["27.0"]):
        amc = {"question": "q", "answer": answer}
        assert E.BENCHES["amc23"].gold(amc) == "27" and E.score("amc23", "So \\boxed{27}.", amc) == 1.0
    third = {"input": "q", "target": 14053029.666666666}
    for answer, expected in [("\\boxed{14053029.667}", 1), ("\\boxed{14,053,029.6667}", 1), ("\\boxed{14053029}", 0),
                             ("The answer is 14053029.6666", 1), ("\\boxed{\\frac{42159089}{3}}", 1),
                             ("\\boxed{14053029.67}", 0)]:
        assert E.score("gsm-hard", answer, third) == expected, answer
    assert E.score("gsm-hard", "\\boxed{\\$3,737,022}", {"input": "q", "target": 3737022.0}) == 1.0
    assert E.score("math500", "\\boxed{0.3334}", ex("0.3333")) == 0.0         # no tolerance outside GSM-HARD
    gsm8k = {"question": "q", "answer": "1,000 + 250 = <<1000+250=1250>>1,250 people.\n#### 1,250"}
    assert E.BENCHES["gsm8k"].gold(gsm8k) == "1250" and E.score("gsm8k", "So \\boxed{1250}.", gsm8k) == 1.0
    omni = {"problem": "p", "answer": "\\[\n\\boxed{\\frac{n}{n+1}}\n\\]"}
    assert E.BENCHES["omni-math"].gold(omni) == "\\frac{n}{n+1}"


MODEL_FORMS = [  # (bench, row, completion, expected): answers as real datasets and models write them
    ("aime24", {"problem": "p", "answer": "025"}, "\\boxed{25}", 1),
    ("aime24", {"problem": "p", "answer": "025"}, "\\boxed{250}", 0),
    ("aime25", {"problem": "p", "answer": 70}, "The answer is $\\boxed{70}$.", 1),
    ("minerva", {"question": "q", "answer": "4.5e33"}, "\\boxed{4.5 \\times 10^{33}}", 1),
    ("minerva", {"question": "q", "answer": "4.5e33"}, "\\boxed{4.5e33}", 1),
    ("minerva", {"question": "q", "answer": "4.5e33"}, "\\boxed{4.5 \\times 10^{32}}", 0),
    ("olympiadbench", {"question": "q", "final_answer": ["$(1,8,19), (2,7,13), (4,5,7)$"]},
     "\\boxed{(2,7,13), (1,8,19), (4,5,7)}", 1),
    ("olympiadbench", {"question": "q", "final_answer": ["$(1,8,19), (2,7,13), (4,5,7)$"]},
     "\\boxed{(1,8,19), (2,7,13)}", 0),
    ("olympiadbench", {"question": "q", "final_answer": ["1,3,5"]}, "\\boxed{1, 3, 5}", 1),
    ("olympiadbench", {"question": "q", "final_answer": ["1,3,5"]}, "\\boxed{1, 3}", 0),
    ("olympiadbench", {"question": "q", "final_answer": ["$69$,$84$"]}, "\\boxed{69, 84}", 1),
    ("olympiadbench", {"question": "q", "final_answer": ["$k=1$"]}, "\\boxed{k=1}", 1),
    ("olympiadbench", {"question": "q", "final_answer": ["$k=1$"]}, "\\boxed{1}", 1),
    ("olympiadbench", {"question": "q", "final_answer": ["$k=1$"]}, "\\boxed{k=2}", 0),
    ("olympiadbench", {"question": "q", "final_answer": ["$f(x)=2 x$"]}, "\\boxed{f(x) = 2x}", 1),
    ("olympiadbench", {"question": "q", "final_answer": ["$f(x)=2 x$"]}, "\\boxed{2x}", 1),
    ("olympiadbench", {"question": "q", "final_answer": ["$f(x)=2 x$"]}, "\\boxed{f(x)=3x}", 0),
    ("gsm8k", {"question": "q", "answer": "9 * 2 = <<9*2=18>>18\n#### 18"}, "She makes 9 * 2 = 18.\n#### 18", 1),
    ("gsm8k", {"question": "q", "answer": "9 * 2 = <<9*2=18>>18\n#### 18"}, "#### 19", 0),
    ("gsm8k", {"question": "q", "answer": "It costs 1,200.\n#### 1,200"}, "\\boxed{1,200}", 1),
    ("omni-math", {"problem": "p", "answer": "\\[\n\\boxed{\\frac{n+1}{4n-2}}\n\\]"}, "\\boxed{\\frac{n+1}{4n-2}}", 1),
    ("omni-math", {"problem": "p", "answer": "0 \\leq r \\leq \\frac{1}{2}"}, "\\boxed{[0, \\frac{1}{2}]}", 1),
    ("omni-math", {"problem": "p", "answer": "0 \\leq r \\leq \\frac{1}{2}"}, "\\boxed{0 \\le r \\le 1/2}", 1),
    ("omni-math", {"problem": "p", "answer": "0 \\leq r \\leq \\frac{1}{2}"}, "\\boxed{(0, \\frac{1}{2})}", 0),
    ("omni-math", {"problem": "p", "answer": "(-\\infty, 2]"}, "\\boxed{x \\le 2}", 1),
]


@pytest.mark.parametrize("bench,row,completion,expected", MODEL_FORMS)
def test_answers_as_datasets_and_models_write_them(bench, row, completion, expected):
    """Catches a leading zero, e-notation, a tuple or list, a left-hand side, GSM8K's "#### N", a boxed gold or an
    interval against an inequality scored by its text instead of its value."""
    assert E.score(bench, completion, row) == expected


def test_last_boxed_nesting_and_escapes():
    """Catches nested or escaped braces cutting a box short, and an unclosed last box taken for the answer."""
    assert E.last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert E.last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert E.last_boxed("\\boxed{1} and \\boxed{2") == "1"                 # an unclosed last box is skipped


def last_boxed_readable(text):
    """The definition, by rescanning from each box: the last box (by start) that closes, or the token after
    `\\boxed `. Quadratic, for comparison only."""
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
    """Catches the one-pass brace pairing disagreeing with the plain definition on any mix of boxes and braces."""
    text = "".join(parts)
    assert E.last_boxed(text) == last_boxed_readable(text)


# ----------------------------------------------------------------------------------------------
# Multiple-choice scorer

MEDQA = {"question": "A 54-year-old man with type 2 diabetes ... most appropriate initial medication?",
         "options": {"A": "Insulin glargine", "B": "Glipizide", "C": "Metformin", "D": "Pioglitazone"},
         "answer_idx": "C"}
MEDMCQA = {"question": "Which vitamin is synthesised in the skin?", "opa": "Vitamin A", "opb": "Vitamin C",
           "opc": "Vitamin D", "opd": "Vitamin K", "cop": 2}
MMLU = {"question": "Which bone forms the prominence of the cheek?", "subject": "anatomy",
        "choices": ["Maxilla", "Zygomatic bone", "Nasal bone", "Sphenoid bone"], "answer": 1}
PRELOAD = {"question": "Which change shortens ...?", "answer_idx": "B",   # option texts opening with "A"
           "options": {"A": "Increased preload", "B": "A reduction in diastolic filling time",
                       "C": "Decreased afterload",
                       "D": "A drop in systolic blood pressure of 14 mmHg during inspiration"}}

CHOICE_CASES = [  # (bench, example, completion, the letter it picks or None); MEDQA's gold is C
    ("medqa", MEDQA, "<think>First-line therapy is metformin.</think><answer>C</answer>", "C"),
    ("medqa", MEDQA, "<think>x</think><answer>(C)</answer>", "C"),
    ("medqa", MEDQA, "<think>x</think><answer>C. Metformin</answer>", "C"),
    ("medqa", MEDQA, "<think>x</think><answer>metformin.</answer>", "C"),
    ("medqa", MEDQA, "<think>The answer is C.</think><answer>B</answer>", "B"),
    ("medqa", MEDQA, "<think>Metformin lowers glucose.</think><answer>C", "C"),
    ("medqa", MEDQA, "<think>Thinking about sulfonylureas and metformin... the answer is C", None),
    ("medqa", MEDQA, "The answer is (C).", "C"),
    ("medqa", MEDQA, "the answer is c", "C"),
    ("medqa", MEDQA, "Answer: **C**", "C"),
    ("medqa", MEDQA, "**Answer:** C", "C"),
    ("medqa", MEDQA, "**Answer: C. Metformin**", "C"),
    ("medqa", MEDQA, "answer: [C]", "C"),
    ("medqa", MEDQA, "**C**", "C"),
    ("medqa", MEDQA, "(c) metformin", "C"),
    ("medqa", MEDQA, "C: Metformin", "C"),
    ("medqa", MEDQA, "C.", "C"),
    ("medqa", MEDQA, "The correct option is C.", "C"),
    ("medqa", MEDQA, "The best choice is (c)", "C"),
    ("medqa", MEDQA, "Option C is correct because it does not cause hypoglycemia.", "C"),
    ("medqa", MEDQA, "The correct answer is option C: Metformin.", "C"),
    ("medqa", MEDQA, "Therefore \\boxed{\\text{C}}", "C"),
    ("medqa", MEDQA, "I would start metformin.", "C"),
    ("medqa", MEDQA, "The answer is Metformin (C).", "C"),
    ("medqa", MEDQA, "The answer is B. No, actually the answer is C.", "C"),               # the last statement
    ("medqa", MEDQA, "The answer is B? Let me reconsider the renal function. \\boxed{C}", "C"),
    ("medqa", MEDQA, "Answer: B.\nHmm, no: (C) is the correct answer.", "C"),
    ("medqa", MEDQA, "A patient like this needs metformin, so the answer is C.", "C"),       # "A" the word
    ("medqa", MEDQA, "A 54-year-old man should receive lifestyle advice.", None),
    ("medqa", MEDQA, "The answer is a drug that lowers hepatic glucose output.", None),
    ("medqa", MEDQA, "Consider each option.\nA. Insulin glargine: not first line.\nB. Glipizide: hypoglycemia.\n"
                     "C. Metformin: first line.\nD. Pioglitazone: edema.", None),             # a walk through them
    ("medqa", MEDQA, "- **A. Insulin glargine**: no\n- **C. Metformin**: first line\n\n**Answer: C**", "C"),
    ("medqa", MEDQA, "A. no\nB. no\nSo the answer is Metformin.", "C"),
    ("medqa", MEDQA, "Sulfonylureas risk hypoglycemia and insulin is not needed yet. " * 5 + "\n\nC. Metformin", "C"),
    ("medqa", MEDQA, "I think it's C, no wait, the answer is B.", "B"),
    ("medqa", MEDQA, "Glipizide", "B"),
    ("medqa", MEDQA, "Answer: E", None),            # not an option of this question
    ("medqa", MEDQA, "", None),
    ("medmcqa", MEDMCQA, "Vitamin D is synthesised in the skin under UVB light.", "C"),
    ("medmcqa", MEDMCQA, "The answer is Vitamin C", "B"),   # the option's text names option B, not letter C
    ("medmcqa", MEDMCQA, "Vitamin C is the correct answer.", "B"),
    ("mmlu-medical", MMLU, "The answer is Zygomatic bone.", "B"),
    ("mmlu-medical", MMLU, "<think>cheek bone</think><answer>Maxilla</answer>", "A"),
    ("medqa", PRELOAD, "The answer is A reduction in diastolic filling time.", "B"),          # text opening with "A"
    ("medqa", PRELOAD, "The answer is A drop in systolic blood pressure of 14 mmHg during inspiration", "D"),
    ("medqa", PRELOAD, "The answer is A. Increased preload", "A"),                            # the letter, as one
    ("medqa", PRELOAD, "The answer is A because preload rises.", "A"),
]


@pytest.mark.parametrize("bench,example,completion,expected", CHOICE_CASES)
def test_choice_scorer_verdicts(bench, example, completion, expected):
    """Catches a wrong option picked from the forms models write (tagged, stated, by letter or text, a walk through the
    options, a later correction), or one picked where none is."""
    b = E.BENCHES[bench]
    assert E.extract_choice(completion, b.options(example)) == expected
    assert E.score(bench, completion, example) == float(expected == b.gold(example))


TRICKY_OPTIONS = [   # option texts that collide, or read as a letter, unless symbols and whole texts count
    {"A": "Rh+ve", "B": "Rh-ve", "C": "Rh null", "D": "Bombay phenotype"},
    {"A": "α2 agonist", "B": "β2 agonist", "C": "β1 blocker", "D": "α1 blocker"},
    {"A": "A alpha", "B": "A delta", "C": "B fibers", "D": "C fibers"},
    {"A": "↑ PTH, ↓ calcium", "B": "↓ PTH, ↑ calcium", "C": "↑ PTH, ↑ calcium", "D": "Normal PTH"},
    {"A": "IL-2", "B": "IL-10", "C": "IL-13", "D": "TNF-α"},
    PRELOAD["options"], MEDQA["options"],
]
TEXT_FORMS = ["The answer is {t}", "the answer is {t}.", "Answer: {t}", "**Answer:** {t}",
              "<think>x</think><answer>{t}</answer>", "{t}", "So the final answer is: {t}"]


@pytest.mark.parametrize("options", TRICKY_OPTIONS)
def test_an_options_text_names_that_option_only(options):
    """Every option's text, stated in each usual form, picks that option and no other."""
    for form, (letter, text) in itertools.product(TEXT_FORMS, options.items()):
        assert E.extract_choice(form.format(t=text), options) == letter, (form, text)


# ----------------------------------------------------------------------------------------------
# Hostile completions: bounded time, nothing executed, nothing logged

def test_hostile_completions_score_zero_in_bounded_time(tmp_path, capfd, caplog, monkeypatch):
    """Catches code executed through sympy's parser, an exponent tower or a huge number hanging the scorer, and a
    hostile answer echoed to the logs."""
    monkeypatch.setattr(E, "MAX_SCORED_CHARS", 10 ** 6)   # the long answers must reach the filter, not the cap
    target = tmp_path / "pwned"
    code = f"__import__('os').system('touch {target}')"
    hostile = [f"The answer is \\boxed{{{code}}}", f"\\boxed{{{code.replace('__import__', 'eval')}}}",
               "Clearly \\boxed{2^{2^{2^{2^{2^{100}}}}}}", "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
               "\\boxed{" + "+".join(["x"] * 20000) + "}", "\\boxed{2^{9999999999}}", "\\boxed{123456!}",
               "So the answer is " + "9" * 5000]
    t0 = time.time()
    rewards, counters = E.score_batch("math500", hostile, [ex("5")] * len(hostile))
    assert rewards == [0.0] * len(hostile) and counters["filtered"] >= 6
    assert time.time() - t0 < 30                        # a safety bound, not a speed benchmark
    assert E._VERIFIER.verify("\\boxed{5}", "\\boxed{" + code + "}", 10.0) is False   # unfiltered: nothing runs
    assert not target.exists()
    out, err = capfd.readouterr()
    assert "__import__" not in out + err + caplog.text and "x+x+x" not in out + err + caplog.text


def test_timeout_is_counted_not_logged_and_the_worker_restarts(monkeypatch, capfd, caplog):
    """Catches a slow check that hangs the scorer, is not counted, is logged, or leaves the next check without a
    worker."""
    monkeypatch.setattr(E, "hostile_reason", lambda ans: None)   # let a slow answer reach sympy
    monkeypatch.setattr(E, "MAX_SCORED_CHARS", 10 ** 6)
    monkeypatch.setattr(E, "VERIFY_TIMEOUT_S", 0.5)
    slow = "\\boxed{" + "+".join(["x"] * 20000) + "}"
    rewards, counters = E.score_batch("math500", [slow, "\\boxed{0.5}"], [ex("5"), ex("\\frac12")])
    assert rewards == [0.0, 1.0] and counters["timeouts"] == 1   # the next call ran on a fresh worker
    out, err = capfd.readouterr()
    assert "x+x+x" not in out + err + caplog.text


def test_hostile_prefilter_by_hand():
    """Catches a filter that lets sympy-killers through, or that refuses ordinary answers."""
    for ans, reason in [("2^{2^{2^{2^{2^{100}}}}}", "exponent tower"), ("2^2^2^2", "exponent tower"),
                        ("10^{1000000}", "huge exponent"), ("123456!", "huge factorial"),
                        ("(" * 31 + ")" * 31, "nesting"), ("1+" * 300 + "1", "length"), ("x.__class__", "dunder")]:
        assert E.hostile_reason(ans) == reason, ans
    for ans in ["e^{x^2}", "2^{10}", "10^{100}", "x^{2}+y^{2}", "2^{10} \\cdot 3^{5}", "5!", "((1+2)\\cdot3)"]:
        assert E.hostile_reason(ans) is None, ans


HOSTILE_SCANS = [  # each took over 30 s (some hours) on an earlier, backtracking scorer
    ("medqa", "Answer" + " " * 100 + "!"), ("medqa", "My final answer" + "\n" * 120 + "(see the reasoning above)"),
    ("medqa", "The answer is:" + " " * 400 + "?"), ("medqa", "**Answer:**" + " \n" * 20_000 + "?"),
    ("medqa", "The correct option is" + " " * 3000 + "!"), ("medqa", "<answer>" * 40_000),
    ("medqa", "answer is " * 40_000), ("math500", "\\boxed{" * 40_000), ("math500", "the answer is" + "\n" * 50_000),
]


@pytest.mark.parametrize("bench,completion", HOSTILE_SCANS)
def test_degenerate_completions_score_zero_without_backtracking(bench, completion):
    """Catches a scan that backtracks super-linearly on a degenerate completion."""
    with deadline(60):
        assert E.score(bench, completion, MEDQA if bench == "medqa" else ex("5")) == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["answer", "Answer", " is", ":", " ", "\n", "*", "**", "(", ")", "C", "A", "option",
                                 "\\boxed{", "}", "<answer>", "</answer>", "</think>", "=", "-", "$", "c", "."]),
                min_size=1, max_size=20), st.integers(1, 3000))
def test_random_degenerate_completions_finish(parts, repeat):
    """Catches a super-linear scan on any repetition of answer-like fragments."""
    with deadline(60):
        E.extract_choice("".join(parts) * repeat, MEDQA["options"])
        E.extract_math_answer("".join(parts) * repeat)


def test_only_the_end_of_a_long_completion_is_read():
    """Catches an answer read from the start of a long completion, and an unclosed <think> scored as an answer."""
    filler = "Let me think about this again. " * 500            # longer than MAX_SCORED_CHARS
    assert E.extract_choice(filler + "The answer is C.", MEDQA["options"]) == "C"
    assert E.extract_choice("The answer is C." + filler, MEDQA["options"]) is None   # the statement is cut off
    assert E.score("math500", filler + "\\boxed{5}", ex("5")) == 1.0
    assert E.score("math500", "<think>" + filler + "\\boxed{5}", ex("5")) == 0.0     # an unclosed think, seen whole


THREAD_CASES = [(f"The answer is \\boxed{{\\frac{{{k}}}{{2}}}}.", str(k / 2)) for k in range(1, 13)]


def test_score_from_threads():
    """Catches math-verify's SIGALRM timeouts (main thread only) reaching a scorer called from threads."""
    with cf.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda c: E.score("math500", c[0], ex(c[1])), THREAD_CASES)) == [1.0] * 12


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_score_from_worker_processes(method):
    """Catches a forked child writing to its parent's verifier process (or a spawned one failing to start one)."""
    E.score("math500", "\\boxed{0.50}", ex("\\frac12"))   # the parent's worker exists before a fork
    completions, golds = zip(*THREAD_CASES[:4])
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as pool:
        assert list(pool.map(E.score, ["math500"] * 4, completions, map(ex, golds))) == [1.0] * 4
    assert E.score("math500", "\\boxed{0.25}", ex("\\frac14")) == 1.0   # the parent's still works


# ----------------------------------------------------------------------------------------------
# Metrics and the synthetic tasks

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_enumeration(nck):
    """Catches a biased or off-by-one pass@k."""
    n, c, k = nck
    subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
    assert E.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_majority_and_summary_by_hand():
    """Catches maj@n's vote split by spacing or \\dfrac, its tie rule, and any summary metric off its hand-computed
    value."""
    assert E.majority_correct(["5", "4", "5", None], [True, False, True, False]) == 1.0
    assert E.majority_correct(["4", "5", "5", "4"], [False, True, True, False]) == 0.0   # tie: first seen
    assert E.majority_correct(["\\dfrac{1}{2}", "\\frac{1}{2}", "3"], [True, True, False]) == 1.0
    assert E.majority_correct([None, None], [False, False]) == 0.0
    rows = [dict(correct=[True, False], extracted=["1", "2"], status=["ok", "ok"], truncated=[False, True],
                 response_tokens=[3, 5]),
            dict(correct=[False, False], extracted=[None, "7"], status=["no_answer", "timeout"],
                 truncated=[False, False], response_tokens=[2, 2])]
    m = E.summarize(rows, 2)
    assert m["accuracy"] == m["avg@2"] == m["pass@1"] == pytest.approx(0.25)
    assert m["pass@2"] == pytest.approx(0.5) and m["maj@2"] == pytest.approx(0.5)
    assert (m["timeouts"], m["no_answer"], m["truncated_frac"], m["mean_response_tokens"]) == (1, 1, 0.25, 3.0)
    assert m["tokens_per_correct"] == 12 / 1                       # every sample's tokens over the one correct
    assert E.summarize([dict(rows[1], correct=[False, False])], 2)["tokens_per_correct"] is None


def test_synthetic_tasks_are_pinned_disjoint_and_self_consistent():
    """Catches any change to the rows the demo, the study and the tests were measured on (the hashes are those of
    the generator as first written), a question in both splits, and a target completion that scores 0."""
    for bench, digest in [("add", "5a24c4ea95117ac8"), ("chain", "2d6dd56f76951a4d")]:
        train = E.load_examples(bench, "train", limit=300, seed=0)
        test = E.load_examples(bench, "test", limit=50, seed=3)
        assert hashlib.sha256(json.dumps(train + test).encode()).hexdigest()[:16] == digest
        assert not {r["question"] for r in train} & {r["question"] for r in E.load_examples(bench, "test", limit=500)}
        for r in train[:50]:
            assert E.score(bench, r["solution"], r) == 1.0 and E.score(bench, str(int(r["answer"]) + 1), r) == 0.0
    assert len(E.load_examples("add", "test")) == 500 and len(E.load_examples("chain", "train")) == 5000


def test_integer_scorer():
    """Catches the synthetic tasks' scorer reading a number other than the one right after the last "="."""
    add = {"question": "12+34=", "answer": "46"}
    for completion, expected in [("46", 1), (" 46", 1), ("46<junk", 1), ("47", 0), ("460", 0), ("", 0),
                                 ("12+34=46", 1), ("12+34=46;46+56=102", 0), ("x=46", 1), ("=-46", 0),
                                 ("9" * 5000, 0), ("9" * 10_000 + "=46", 1)]:
        assert E.score("add", completion, add) == expected, completion[:20]


# ----------------------------------------------------------------------------------------------
# Loading

@pytest.mark.parametrize("bench", list(FIXTURES))
def test_load_each_benchmark_schema(bench):
    """Catches a loader or a gold that misreads a benchmark's own schema: a completion that boxes (or tags) each
    row's gold scores 1, and another row's scores 0."""
    rows = E.load_examples(bench, data=str(DATA / FIXTURES[bench]))
    assert len(rows) == (4 if bench == "math" else 3)   # mmlu: the astronomy row is not medical
    b = E.BENCHES[bench]
    golds = [b.gold(r).replace("$", "") for r in rows]   # a model boxes OlympiadBench's "$k=1$" as k=1
    for r, gold, other in zip(rows, golds, golds[1:] + golds[:1]):
        answer = "<think>x</think><answer>{}</answer>" if b.scorer == "choice" else "So \\boxed{{{}}}."
        assert E.score(bench, answer.format(gold), r) == 1.0
        assert other == gold or E.score(bench, answer.format(other), r) == 0.0


def test_gpqa_options_are_shuffled_the_same_way_every_time():
    """Catches GPQA's correct answer always listed first (a model learns "A"), or an order that changes between runs
    or processes (random.Random seeded by the question's text, not hash())."""
    rows = E.load_examples("gpqa-diamond", data=str(DATA / "gpqa-diamond.csv"))
    assert [E.BENCHES["gpqa-diamond"].gold(r) for r in rows] == ["B", "C", "A"]   # the order pinned
    code = "import evaluate as E; print(E.BENCHES['gpqa-diamond'].options({'Question': 'q', 'Correct Answer': 'x', " \
           "'Incorrect Answer 1': 'y', 'Incorrect Answer 2': 'z', 'Incorrect Answer 3': 'w'}))"
    runs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(ENV, PYTHONHASHSEED=str(seed)),
                           capture_output=True, text=True, timeout=120).stdout for seed in (1, 2)}
    assert len(runs) == 1 and "'x'" in runs.pop()


def test_load_limit_and_the_random_math_draw():
    """Catches --limit taking other rows than the first N, and MATH's random draw not following --seed."""
    math500 = E.load_examples("math500", data=str(DATA / "math500.json"))
    assert E.load_examples("math500", data=str(DATA / "math500.json"), limit=2) == math500[:2]
    drawn = E.load_examples("math", data=str(DATA / "math.jsonl"), limit=3, seed=3)       # MATH is drawn at random
    assert drawn == E.load_examples("math", data=str(DATA / "math.jsonl"), limit=3, seed=3)
    assert drawn != E.load_examples("math", data=str(DATA / "math.jsonl"), limit=3, seed=4)


def test_a_bad_file_or_row_is_one_line_naming_file_and_line(tmp_path):
    """Catches a bad file or row reported as a traceback, or without its file and line (or row), and --limit hiding a
    bad row."""
    rows = E.load_examples("medqa", data=str(DATA / "medqa.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n\n" + '{"question": "q", "options": ' + "\n" + json.dumps(rows[1]) + "\n")
    for flag in ("--data", "--val-data"):   # train.py names its validation file
        with pytest.raises(ValueError, match=rf"^{flag} .*bad\.jsonl: line 3 is not JSON"):
            E.load_examples("medqa", data=str(bad), flag=flag)
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(rows, indent=1).replace('"answer_idx": "C"', '"answer_idx": C', 1))
    with pytest.raises(ValueError, match=r"pretty\.json: line \d+ is not JSON"):
        E.load_examples("medqa", data=str(pretty))
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(ValueError, match=r"garbage\.parquet: not a readable parquet file"):
        E.load_examples("medmcqa", data=str(tmp_path / "garbage.parquet"))
    write_jsonl(tmp_path / "third.jsonl", rows[:2] + [{k: v for k, v in rows[2].items() if k != "options"}])
    with pytest.raises(ValueError, match=r"third\.jsonl: line 3: field 'options'"):
        E.load_examples("medqa", data=str(tmp_path / "third.jsonl"), limit=1)   # checked beyond --limit too
    write_jsonl(tmp_path / "option_b.jsonl", rows[:1] + [dict(rows[1], options=dict(rows[1]["options"], B=["x"] * 2))])
    with pytest.raises(ValueError, match=r"option_b\.jsonl: line 2: field 'options\.B': expected text, got list"):
        E.load_examples("medqa", data=str(tmp_path / "option_b.jsonl"))
    write_jsonl(tmp_path / "gold_e.jsonl", rows[:1] + [dict(rows[1], answer_idx="E")])
    with pytest.raises(ValueError, match=r"line 2: field 'answer_idx': 'E' is neither an option letter"):
        E.load_examples("medqa", data=str(tmp_path / "gold_e.jsonl"))
    (tmp_path / "list.json").write_text(json.dumps([{"problem": ["What is", "1+1?"], "answer": "2"}] * 2))
    with pytest.raises(ValueError, match=r"list\.json: row 1: field 'problem': expected text, got list"):
        E.load_examples("math500", data=str(tmp_path / "list.json"))
    with pytest.raises(ValueError, match=r"^--data /no/such\.jsonl: no such file"):
        E.load_examples("medqa", data="/no/such.jsonl")
    with pytest.raises(ValueError, match="bench math500 has no train split"):
        E.load_examples("math500", "train")


def medmcqa_rows(cops):
    return [{"question": f"q{i}", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": c} for i, c in enumerate(cops)]


def test_medmcqa_cop_codings(tmp_path, capsys):
    """The hub's 0-3 and the original release's 1-4 give the same golds; a file that fits both is refused."""
    golds = lambda name, cops: [E.BENCHES["medmcqa"].gold(r) for r in E.load_examples(   # noqa: E731
        "medmcqa", data=write_jsonl(tmp_path / name, medmcqa_rows(cops)))]
    assert golds("zero.jsonl", [0, 3, 1, 2, 0]) == ["A", "D", "B", "C", "A"] and "note" not in capsys.readouterr().err
    assert golds("one.jsonl", [1, 4, 2, 3, 1]) == ["A", "D", "B", "C", "A"] and "1..4" in capsys.readouterr().err
    assert golds("letters.jsonl", ["b", "c"]) == ["B", "C"]
    with pytest.raises(ValueError, match=r"ambiguous\.jsonl: every cop lies in 1\.\.3.*letter"):
        golds("ambiguous.jsonl", [1, 2, 3, 2])
    with pytest.raises(ValueError, match=r"mixed\.jsonl: line 3: cop 4 in a file that also has cop 0"):
        golds("mixed.jsonl", [0, 1, 4])
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 4: field 'cop': 7"):
        golds("bad.jsonl", [0, 1, 2, 7, 3])


def test_mmlu_is_kept_to_the_medical_subjects(tmp_path):
    """Catches MMLU's other 51 subjects scored as medicine: a file's other subjects are dropped, and a row without a
    subject refuses the file."""
    rows = E.load_examples("mmlu-medical", data=str(DATA / "mmlu-medical.json"))
    assert {r["subject"] for r in rows} <= set(E.MEDICAL)
    write_jsonl(tmp_path / "partly.jsonl", rows[:1] + [{k: v for k, v in rows[1].items() if k != "subject"}])
    with pytest.raises(ValueError, match=r"partly\.jsonl: line 2: no subject"):
        E.load_examples("mmlu-medical", data=str(tmp_path / "partly.jsonl"))
    write_jsonl(tmp_path / "astronomy.jsonl", [dict(rows[0], subject="astronomy")])
    with pytest.raises(ValueError, match="no rows of the medical subjects"):
        E.load_examples("mmlu-medical", data=str(tmp_path / "astronomy.jsonl"))


def test_hub_offline_fails_fast_with_advice(monkeypatch):
    """Catches a minute of retries (or a traceback) where the hub cannot be reached."""
    t0 = time.time()
    with pytest.raises(ValueError, match="could not load it.*--data PATH"):
        E.load_examples("medqa")                                           # HF_HUB_OFFLINE=1, nothing cached
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")                # nothing listens there
    with pytest.raises(ValueError, match=r"medqa's test split \(Neelectric/MedQA-USMLE\): the Hugging Face hub is "
                                         "unreachable; pass --val-data PATH"):
        E.load_examples("medqa", flag="--val-data")                         # named by the flag that gives the file
    with pytest.raises(ValueError, match="--model Qwen/Qwen3-1.7B: the Hugging Face hub is unreachable"):
        E.check_hub_model("Qwen/Qwen3-1.7B")
    assert time.time() - t0 < 20


def test_prompts(tiny_tokenizer):
    """Catches a prompt that loses the papers' MATH instruction, MedQA's options or Qwen3's thinking switch."""
    row = E.load_examples("math", data=str(DATA / "math.jsonl"))[0]
    text = tiny_tokenizer.decode(E.prompt_ids("math", row, tiny_tokenizer))
    assert text.endswith(row["problem"] + " " + E.MATH_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
    text = tiny_tokenizer.decode(E.prompt_ids("medqa", MEDQA, tiny_tokenizer))
    assert E.CHOICE_SYSTEM in text and "?\nA. Insulin glargine\nB. Glipizide\nC. Metformin\nD. Pioglitazone" in text
    chain = {"question": "1+2+3=", "answer": "6"}
    assert tiny_tokenizer.decode(E.prompt_ids("chain", chain, tiny_tokenizer)) == "1+2+3="   # raw: no template
    tok = rollout.build_tiny_tokenizer()   # a template with Qwen3's thinking switch
    tok.chat_template = rollout.CHAT_TEMPLATE + ("{% if add_generation_prompt and enable_thinking is defined and "
                                                 "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}")
    assert tok.decode(E.prompt_ids("math500", ex("2"), tok)).endswith("assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(E.prompt_ids("math500", ex("2"), tok, thinking=True)).endswith("assistant\n")


# ----------------------------------------------------------------------------------------------
# evaluate() and the command

def test_evaluate_metrics_with_scripted_sampler(monkeypatch, tiny_model, tiny_tokenizer):
    """The metrics through the whole pipeline, by hand: catches rows and samples mixed up between examples."""
    examples = [{"question": "12+34=", "answer": "46"}, {"question": "50+50=", "answer": "100"}]
    script = {"12+34=": ["46", "47", "46"], "50+50=": ["1", "2", "3"]}   # c = 2 of 3, and 0 of 3
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id

    def fake_sample(model, prompts, group_size, cfg, *, eos_token_ids, pad_token_id, seed=0, prompt_keys=None):
        assert [examples[k]["question"] for k in prompt_keys] == [tiny_tokenizer.decode(q) for q in prompts]
        ids = [tiny_tokenizer.encode(t, add_special_tokens=False) + [eos]
               for q in prompts for t in script[tiny_tokenizer.decode(q)]]
        response_ids = torch.tensor([r + [pad] * (4 - len(r)) for r in ids])
        return types.SimpleNamespace(response_ids=response_ids, response_mask=response_ids != pad,
                                     finished=torch.ones(len(ids), dtype=torch.bool))

    monkeypatch.setattr(rollout, "sample", fake_sample)
    summary, rows = E.evaluate(tiny_model, tiny_tokenizer, "add", examples, n=3, temperature=1.0, batch_size=1,
                               progress=False)
    assert summary["accuracy"] == summary["avg@3"] == pytest.approx(1 / 3)
    assert summary["pass@2"] == pytest.approx((1 - math.comb(1, 2) / math.comb(3, 2)) / 2)
    assert summary["pass@3"] == pytest.approx(0.5) and summary["maj@3"] == pytest.approx(0.5)
    assert rows[0]["completions"] == ["46", "47", "46"] and rows[0]["correct"] == [True, False, True]
    assert rows[1]["gold"] == "100" and rows[0]["prompt"] == "12+34=" and rows[0]["response_tokens"] == [3, 3, 3]


def test_samples_do_not_depend_on_the_batch(tiny_model, tiny_tokenizer):
    """An example's samples are keyed by its index: catches samples that change with the batch size (and so with
    the number of ranks)."""
    examples = E.load_examples("add", limit=5)
    runs = [E.evaluate(tiny_model, tiny_tokenizer, "add", examples, n=3, temperature=1.0, max_new_tokens=5,
                       batch_size=size, progress=False)[1] for size in (2, 5)]
    assert [r["completions"] for r in runs[0]] == [r["completions"] for r in runs[1]]
    assert len({c for r in runs[0] for c in r["completions"]}) > 3            # sampled, not all alike


def test_command_sampling_metrics(tmp_path):
    """Catches the command's pass@k disagreeing with the rows it wrote, and a suite table written for one benchmark."""
    results = E.main(["--bench", "add", "--model", "tiny", "--limit", "5", "--n", "4", "--temperature", "1.0",
                      "--max-new-tokens", "6", "--out", str(tmp_path), "--no-progress"])
    rows = [json.loads(line) for line in (tmp_path / "add.jsonl").read_text().splitlines()]
    summary = results["tiny"]["add"]
    for k in (1, 2, 4):
        assert summary[f"pass@{k}"] == pytest.approx(sum(E.pass_at_k(4, sum(r["correct"]), k) for r in rows) / 5)
    assert {"avg@4", "maj@4"} <= set(summary) and not (tmp_path / "suite.md").exists()   # one bench: no table


def test_the_math_suite_end_to_end_offline(tiny_model_dir, tmp_path):
    """--suite math over --data-dir (files named after the benchmarks), two models side by side: every benchmark
    evaluated for each, the table (markdown and json) and the plot written."""
    results = E.main(["--suite", "math", "--data-dir", str(DATA), "--model", "tiny", "--compare", tiny_model_dir,
                      "--limit", "1", "--max-new-tokens", "4", "--out", str(tmp_path),
                      "--no-progress"])
    assert list(results) == ["tiny", tiny_model_dir]
    assert all(list(r) == list(E.SUITES["math"]) for r in results.values())
    for out, model in ((tmp_path, "tiny"), (tmp_path / "compare", tiny_model_dir)):
        for bench in E.SUITES["math"]:   # the files agree with the summary and with score() on every completion
            summary = json.loads((out / f"{bench}.json").read_text())
            rows = [json.loads(line) for line in (out / f"{bench}.jsonl").read_text().splitlines()]
            example = E.load_examples(bench, data=str(DATA / FIXTURES[bench]), limit=1)[0]
            assert summary == results[model][bench] and summary["examples"] == len(rows) == 1
            assert rows[0]["gold"] == E.BENCHES[bench].gold(example) and rows[0]["prompt"].startswith("<|im_start|>")
            assert rows[0]["correct"] == [E.score(bench, c, example) == 1.0 for c in rows[0]["completions"]]
    table = (tmp_path / "suite.md").read_text().splitlines()
    assert len(table) == 2 + 10 + 1 and table[-1].startswith("| mean |") and tiny_model_dir in table[0]
    assert json.loads((tmp_path / "suite.json").read_text()) == results and (tmp_path / "suite.png").stat().st_size
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "aime24.jsonl").write_text('{"problem": "p", "answer": "7"}\n{"problem": "q"}\n')
    with pytest.raises(ValueError, match=r"^--data-dir .*mine: no gpqa-diamond\.jsonl"):
        E.main(["--bench", "aime24,gpqa-diamond", "--data-dir", str(tmp_path / "mine"), "--model", "tiny"])
    with pytest.raises(ValueError, match=r"^--data-dir .*aime24\.jsonl: line 2: field 'answer'"):
        E.main(["--bench", "aime24", "--data-dir", str(tmp_path / "mine"), "--model", "tiny"])


def test_flag_errors_are_one_line_before_a_model_loads(monkeypatch, tmp_path):
    """Catches a bad flag found only after a model loads, or reported as more than one line."""
    monkeypatch.setattr(rollout, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("a model was loaded"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv, match in [(["--bench", "nope"], "^--bench 'nope'"), (["--bench", "math,"], "^--bench ''"),
                        (["--suite", "maths"], "^--suite 'maths'"), (["--data-dir", str(a_file)], "^--data-dir"),
                        (["--n", "4"], "^--n 4: greedy"), (["--limit", "0"], "^--limit 0"),
                        (["--temperature", "nan"], "^--temperature nan"), (["--device", "gpu"], "^--device gpu"),
                        (["--bench", "math,medqa", "--data", str(a_file)], "^--data"),
                        (["--bench", "add", "--out", str(a_file)], "^--out .*cannot write there"),
                        (["--bench", "add", "--device", "cuda:99"], "^--device cuda:99: this machine has")]:
        with pytest.raises(ValueError, match=match):
            E.main(["--model", "tiny", "--out", str(tmp_path / "o"), *argv])   # a later --out wins
    for flags, line in [(["--temperature", "-1"], "evaluate.py: error: --temperature -1.0: must be"),
                        (["--tempature", "1"], "evaluate.py: error: unrecognized arguments: --tempature 1 (did you "
                                               "mean --temperature?)")]:
        run = subprocess.run([sys.executable, "evaluate.py", "--model", "tiny", *flags], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and run.stderr.startswith(line) and run.stderr.count("\n") == 1, run.stderr


@dc.dataclass
class DocstringForm:   # help in the docstring under each field (the benchmarks' Args)
    # --- first
    steps: int = 3
    """how many steps"""
    lr: float | None = None
    """learning rate (default: from the model)"""
    # --- second
    quiet: bool = False
    """no bar"""
    sizes: list[int] = dc.field(default_factory=lambda: [1, 2])
    """sizes"""


@dc.dataclass
class CommentForm:   # help in a comment after each field, one line each (train.py's and evaluate.py's Args)
    # --- first
    steps: int = 3  # how many steps
    lr: float | None = None  # learning rate (default: from the model)
    # --- second
    quiet: bool = False  # no bar
    sizes: list[int] = dc.field(default_factory=lambda: [1, 2])  # sizes


@pytest.mark.parametrize("cls", [DocstringForm, CommentForm])
def test_dataclass_parser_help_groups_defaults_and_layers(cls):
    """The argparse builder every entry point uses, on help written in either form: catches a lost --help group or
    help text, a default said twice, and a flag not given overriding a preset."""
    parser = E.dataclass_parser(cls, "demo")
    help_text = parser.format_help()
    assert "first:" in help_text and "second:" in help_text and "how many steps (default: 3)" in help_text
    assert re.search(r"first:\n.*--steps.*--lr.*\n\nsecond:\n.*--quiet.*--sizes", help_text, re.S)   # each in its group
    assert "no bar (default: False)" in help_text and "sizes (default: [1, 2])" in help_text
    assert help_text.count("options:") == 1                                 # argparse's own group, not a second one
    assert help_text.count("default:") == 4 and "(default: from the model)" in help_text
    given = vars(parser.parse_args(["--quiet", "--sizes", "4", "5"]))
    assert cls(**{"steps": 9, **given}) == cls(9, None, True, [4, 5])   # the preset's steps kept


def test_dataclass_parser_reads_a_comment_only_after_the_field():
    """Catches a help cut at a '#' inside a default, a '# --- title' taken for help, or a field without a group
    given a second 'options:' group."""
    @dc.dataclass
    class Tricky:
        tag: str = "a # not a comment"  # the tag
        # --- later
        path: str = os.sep  # where
        count: int = 2

    help_text = E.dataclass_parser(Tricky, "demo").format_help()
    assert "the tag (default: a # not a comment)" in help_text and "where (default: /)" in help_text
    assert re.search(r"options:\n.*--tag.*\n\nlater:\n.*--path.*--count", help_text, re.S)
    assert help_text.count("options:") == 1
