"""evaluate.py: the benchmarks, their verifiable rewards, and `python evaluate.py --bench medqa`.

Training rewards and evaluation share the one definition of "correct" in this file (SPEC 7). In order:

1. Benchmarks: where each one's rows come from (hub id, config, split), how a row is asked (the papers'
   instructions), where its gold answer is, and which scorer applies. Two offline synthetic tasks, "add"
   and "chain", serve the demo, the study and the tests.
2. Scorers, `score(bench, completion, example) -> 1.0 | 0.0`, in time linear in the completion:
   - math: the answer after Qwen3's `</think>` (an unclosed `<think>` has no answer): the last
     `\\boxed{}`/`\\fbox{}`, else the last "answer is X" / "answer: X", else the last number; then
     math-verify equivalence, gold first: `verify(parse(gold), parse(pred))`.
   - choice (medqa, medmcqa, mmlu-medical): the option a completion states, by letter ("the answer is
     (C)", "Answer: C", `<answer>C</answer>`, `\\boxed{C}`, "**C**", "(C) text") or by its text.
   - integer (add, chain): the integer after the last "=" of the completion.
   A completion is data and is never executed.
3. Metrics: accuracy (greedy when temperature is 0); with n samples mean@n, unbiased pass@k
   (Chen et al. 2021) for k = 1, 2, 4, ..., n, and maj@n over extracted answers.
4. `evaluate(model, tokenizer, bench, examples)`: generation through rollout.sample, scoring; under
   torch.distributed the examples are split over ranks and all ranks get the summary.
5. Loading rows: generated (synthetic tasks, seeded, train/test disjoint by hashing), from a local file
   (`--data`: json, jsonl, parquet in the benchmark's own schema, or MMLU's csv), or from the hub. Every
   row is checked when it is loaded, and a bad one is named by its file and line.
6. The command: `python evaluate.py --bench medqa --model Qwen/Qwen3-1.7B` writes OUT/medqa.json
   (summary) and OUT/medqa.jsonl (one row per example); `--data PATH` and `--model tiny` work offline.
Appendix: the filter that keeps obviously hostile answers (absurd length, deep nesting, exponent
towers) away from sympy, and the math-verify child process that bounds every equivalence check by
wall clock (VERIFY_TIMEOUT_S), so that scoring works in any thread or worker process. Timeouts are
counted (score_batch's counters, the summary), not logged.

Departures from the papers and the authors' code (github.com/fatebreaker/tempo):
- MedQA prompt: the authors append the options to the question as "A: x, B: y" and use an R1-style
  system prompt; here the options go one per line ("A. x") under the question and the system prompt
  (our wording) asks for the letter inside <answer> tags. The same prompt serves MedMCQA and MMLU.
- The authors' MedQA reward fuzzy-matches only what is inside <answer> tags; ours also accepts the
  common untagged forms above (used for the untagged outputs of other prompts and models).
- Math: the fallbacks after \\boxed{} ("answer is X", last number) make the reward slightly more
  lenient than "the last \\boxed{} answer" (not every model boxes GSM-HARD's plain numbers).
  GSM-HARD's targets are floats computed by a program: a plain-number answer counts when it is within
  1e-3 of the target, the dataset authors' own check, not math-verify's rounding.
- Only the last MAX_SCORED_CHARS characters of a completion are read, where the final answer is.
- Thinking mode is off by default (--thinking turns it on): the papers' response budget is 2,048
  tokens, which Qwen3's thinking mode routinely exceeds (a truncated think block scores 0), and the
  MedQA format asks for its own <think>...</think><answer>...</answer> in the visible response.
- maj@n groups extracted answers by their text after light normalisation (spaces, \\left/\\right,
  \\dfrac), so equivalent answers written differently are separate votes.
"""
from __future__ import annotations

import argparse
import ast
import atexit
import dataclasses
import difflib
import hashlib
import inspect
import json
import logging
import math
import os
import random
import re
import select
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import typing
from collections import Counter
from dataclasses import dataclass
from typing import Callable

# ----------------------------------------------------------------------------------------------
# 1. Benchmarks

MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
CHOICE_SYSTEM = (
    "You answer a multiple-choice question. Reason step by step inside <think> </think> tags, then "
    "give the letter of the single correct option inside <answer> </answer> tags, for example "
    "<think> reasoning here </think><answer> C </answer>."
)
MEDICAL_SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine",
                    "medical_genetics", "professional_medicine")
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Bench:
    """One benchmark: where its rows come from, how a row is asked, where its answer is."""

    source: str                           # hub dataset id, or "synthetic" (generated offline)
    configs: tuple                        # hub configs loaded and concatenated (None: the default)
    splits: dict                          # our split name ("train"/"test") -> the hub's split name
    question: Callable[[dict], str]       # row -> user message, the papers' instruction included
    gold: Callable[[dict], str]           # row -> reference answer (LaTeX, a letter, an integer)
    scorer: str                           # "math" | "choice" | "integer"
    system: str | None = None             # system message, if any
    options: Callable[[dict], dict] | None = None  # choice benches: row -> {letter: option text}
    shuffle: bool = False                 # seeded random draw before --limit (the paper's MATH split)
    chat: bool = True                     # False: the prompt is the raw question (tiny char model)
    tolerance: float | None = None        # math: a plain-number answer this close to the gold counts


def _field(row: dict, *names: str):
    """The first of `names` present in a row; hub mirrors rename columns, so accept the usual ones."""
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise ValueError(f"example has none of the fields {names}; its fields are {sorted(row)}")


def _text(row: dict, *names: str) -> str:
    """A text field (a question, a solution): a list or a number there is a schema error, not a question."""
    value = _field(row, *names)
    if not isinstance(value, str) or not value.strip():
        name = next(n for n in names if row.get(n) is not None)
        raise ValueError(f"field {name!r} must be non-empty text, got {type(value).__name__} {str(value)[:60]!r}")
    return value.strip()


def _number_text(x) -> str:
    """A gold number as text: 27.0 and "27.0" -> "27" (AMC23 and GSM-HARD store floats); a one-element
    list (an AMC23 copy stores ["27.0"]) is its element; other answers stay as written."""
    if isinstance(x, (list, tuple)):
        if len(x) != 1:
            raise ValueError(f"answer {x!r}: a list answer must hold exactly one value")
        x = x[0]
    if isinstance(x, bool) or not isinstance(x, (int, float, str)) or (isinstance(x, float) and not math.isfinite(x)):
        raise ValueError(f"answer {x!r}: expected a finite number or text")
    if isinstance(x, float):
        return str(int(x)) if x.is_integer() else repr(x)
    text = str(x).strip()
    if not text:
        raise ValueError("answer: empty")
    whole = re.fullmatch(r"(-?\d+)\.0+", text)
    return whole.group(1) if whole else text


_BOX = re.compile(r"\\(?:boxed|fbox)\b\s*")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.S)   # an escaped character (\{ \} \\) never opens or closes
_TOKEN = re.compile(r"[^\s$]+")


def last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} or \\fbox{...} (nested braces; `\\boxed 5` too), or None.

    One pass matches all braces with a stack, so an unclosed box costs no rescan of the text after it
    (an unclosed last box is skipped for the one before it).
    """
    opening, found = {}, []   # position of a box's "{" -> the box's start; (start, content) of complete boxes
    for m in _BOX.finditer(text):
        i = m.end()
        if text.startswith("{", i):
            opening[i] = m.start()
        elif m.group(0).endswith(" ") and (tok := _TOKEN.match(text, i)):   # \boxed 5: the next token
            found.append((m.start(), tok.group(0)))
    if opening:
        stack = []
        for m in _BRACE_OR_ESCAPE.finditer(text):
            if m.group(0) == "{":
                stack.append(m.start())
            elif m.group(0) == "}" and stack:
                i = stack.pop()
                if i in opening:
                    found.append((opening[i], text[i + 1:m.start()].strip()))
    return max(found)[1] if found else None


def _math_gold(row: dict) -> str:
    """MATH-lighteval has no answer column: the gold is the last \\boxed{} of the solution."""
    if row.get("answer") not in (None, ""):
        return _number_text(row["answer"])
    boxed = last_boxed(_text(row, "solution"))
    if not boxed:
        raise ValueError("math example: its solution has no \\boxed{} answer")
    return boxed


def _option_texts(options: dict) -> dict:
    """{letter: text}, letters A-J; a number becomes text (mirrors store "5" as 5), anything else is an error."""
    out = {}
    for k, v in options.items():
        key = str(k).strip().upper()
        if key not in LETTERS or len(key) != 1:
            raise ValueError(f"option key {k!r}: expected a letter A-J")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)) or not str(v).strip():
            raise ValueError(f"option {key}: {type(v).__name__} {str(v)[:60]!r} is not text")
        out[key] = str(v).strip()
    if len(out) < 2:
        raise ValueError(f"{len(out)} option(s): a multiple-choice row needs at least 2")
    return out


def _medqa_options(row: dict) -> dict:
    """Neelectric/MedQA-USMLE: options {letter: text}; some mirrors store [{key, value}, ...]."""
    opts = _field(row, "options")
    if isinstance(opts, list):
        opts = {o["key"]: o["value"] for o in opts}
    return _option_texts({k: v for k, v in sorted(opts.items()) if v is not None})  # parquet structs pad with None


def _medmcqa_options(row: dict) -> dict:
    return _option_texts({"A": row["opa"], "B": row["opb"], "C": row["opc"], "D": row["opd"]})


def _mmlu_options(row: dict) -> dict:
    choices = _field(row, "choices")
    if not isinstance(choices, (list, tuple)):
        raise ValueError(f"field 'choices': expected a list of option texts, got {type(choices).__name__}")
    return _option_texts(dict(zip(LETTERS, choices)))


def _letter(value, options: dict, field: str) -> str:
    """A gold option as a letter: an index 0..n-1 (cais/mmlu's answer, medmcqa's cop) or the letter itself."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().upper() in options:
        return value.strip().upper()
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(options):
        return LETTERS[value]
    raise ValueError(f"field {field!r}: {value!r} is neither an option letter ({', '.join(options)}) "
                     f"nor an index 0..{len(options) - 1}")


def _choice_question(row: dict, options: dict) -> str:
    return _text(row, "question") + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())


def _math_question(*names: str) -> Callable[[dict], str]:
    """The papers' MATH prompt (verl's): the problem, a space, the instruction."""
    return lambda row: _text(row, *names) + " " + MATH_INSTRUCTION


def _integer_gold(row: dict) -> str:
    gold = str(_field(row, "answer")).strip()
    if not re.fullmatch(r"-?\d{1,100}", gold):
        raise ValueError(f"field 'answer': {gold[:60]!r} is not an integer")
    return gold


def _choice_bench(source, configs, splits, options, gold_field) -> Bench:
    return Bench(source, configs, splits, lambda row: _choice_question(row, options(row)),
                 lambda row: _letter(_field(row, gold_field), options(row), gold_field),
                 "choice", system=CHOICE_SYSTEM, options=options)


BENCHES: dict[str, Bench] = {
    # Hendrycks MATH (lighteval mirror): problem, level, type, solution; gold = last \boxed of solution.
    # The paper draws 1,000 train / 100 test at random: shuffle=True, then --limit.
    "math": Bench("DigitalLearningGmbH/MATH-lighteval", (None,), {"train": "train", "test": "test"},
                  _math_question("problem"), _math_gold, "math", shuffle=True),
    # MATH-500: problem, solution, answer, subject, level, unique_id; test split only.
    "math500": Bench("HuggingFaceH4/MATH-500", (None,), {"test": "test"},
                     _math_question("problem"), _math_gold, "math"),
    # GSM-HARD: input, code, target (a float computed by the program); one split, called "train". A plain
    # number within 1e-3 of the target counts: the dataset authors' own check (PAL's gsm_eval.py,
    # abs(answer - target) < 1e-3). A relative tolerance would be too loose for its large targets
    # (1e-6 of 14,053,029.67 is 14) and too strict for a short decimal written out by hand.
    "gsm-hard": Bench("reasoning-machines/gsm-hard", (None,), {"test": "train"},
                      _math_question("input", "question"),
                      lambda row: _number_text(_field(row, "target", "answer")), "math", tolerance=1e-3),
    # AMC23 (40 problems, a test split). A mirror of the same 40 (FlippyDora/amc23's card) has id, problem,
    # question, answer (float64), url; another stores the answer as ["27.0"]: both are read.
    "amc23": Bench("math-ai/amc23", (None,), {"test": "test"},
                   _math_question("question", "problem"),
                   lambda row: _number_text(_field(row, "answer")), "math"),
    # MedQA (USMLE): question, options {letter: text} (4 or 5 options; any letters are read from the
    # row), answer_idx (a letter), answer (its text), meta_info. The paper takes the first 1,000
    # train / 100 test rows. Mirrors storing options as [{key, value}] are accepted.
    "medqa": _choice_bench("Neelectric/MedQA-USMLE", (None,), {"train": "train", "test": "test"},
                           _medqa_options, "answer_idx"),
    # MedMCQA: question, opa..opd, cop, exp, subject_name. The hub's cop is a ClassLabel a-d, so 0-3; a file
    # of the original release (cop 1-4) is recognised and converted when loaded (_medmcqa_zero_based).
    # Its test split has no answers (cop = -1), so "test" is the validation split, as usual.
    "medmcqa": _choice_bench("openlifescienceai/medmcqa", (None,), {"train": "train", "test": "validation"},
                             _medmcqa_options, "cop"),
    # MMLU medical subjects: question, subject, choices [4 texts], answer (int 0-3); one config each.
    "mmlu-medical": _choice_bench("cais/mmlu", MEDICAL_SUBJECTS, {"train": "validation", "test": "test"},
                                  _mmlu_options, "answer"),
    # Synthetic, offline: "12+34=" -> "46".
    "add": Bench("synthetic", (None,), {"train": "train", "test": "test"},
                 lambda row: _text(row, "question"), _integer_gold, "integer", chat=False),
    # Synthetic, offline: "12+34+56+7=" -> "12+34=46;46+56=102;102+7=109" (every running sum a step).
    "chain": Bench("synthetic", (None,), {"train": "train", "test": "test"},
                   lambda row: _text(row, "question"), _integer_gold, "integer", chat=False),
}


def _bench(name: str) -> Bench:
    if name not in BENCHES:
        raise ValueError(f"bench {name!r}: unknown; choose from {', '.join(BENCHES)}")
    return BENCHES[name]


def messages(bench: str, example: dict) -> list[dict]:
    """The chat messages a row is asked as: an optional system prompt, then the user question."""
    b = _bench(bench)
    msgs = [{"role": "system", "content": b.system}] if b.system else []
    return msgs + [{"role": "user", "content": b.question(example)}]


def prompt_ids(bench: str, example: dict, tokenizer, thinking: bool = False) -> list[int]:
    """Token ids of the prompt: the chat template with the generation prompt (real benches), or the
    raw question text (synthetic ones, so the tiny character model sees few tokens).

    `thinking` is Qwen3's enable_thinking switch; templates without it ignore the variable.
    """
    b = _bench(bench)
    if not b.chat:
        return tokenizer.encode(b.question(example), add_special_tokens=False)
    return list(tokenizer.apply_chat_template(messages(bench, example), add_generation_prompt=True,
                                              tokenize=True, return_dict=False, enable_thinking=thinking))


# ----------------------------------------------------------------------------------------------
# 2. Scorers

MAX_SCORED_CHARS = 4000
"""Characters read from the end of a completion. The scored answer is the last one stated (the last
\\boxed{}, "answer is", <answer> tag), and what follows it in a real reply is a closing sentence or two.
4,000 characters keep the whole final paragraph of a long solution with room to spare: ten times the
longest math answer the filter lets through (MAX_ANSWER_CHARS) and many times the longest option text
of the multiple-choice benchmarks. The cap makes the time of every scan a constant; only C string
methods (str.rfind, `in`) see the whole completion, to find </think> and the <answer> tags."""

_BLANKS = re.compile(r"\s+")


def _window(text: str) -> str:
    """The part of a completion the scorers read: its last MAX_SCORED_CHARS characters, each run of
    whitespace squeezed to one character (a newline if it held one), so no pattern below can split a
    long run of blanks between two of its quantifiers."""
    return _BLANKS.sub(lambda m: "\n" if "\n" in m.group(0) else " ", text[-MAX_SCORED_CHARS:])


def strip_think(text: str) -> str | None:
    """The part of a completion after its reasoning: what follows the last </think>.

    An opened and never closed <think> is a reasoning chain cut off before any answer: None.
    """
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return None
    return text


def _normalize_math(ans: str) -> str:
    """Light normalisation for exact-match shortcuts and majority votes (not for correctness)."""
    ans = re.sub(r"\\left|\\right|\\!|\\,|\\;|\s+", "", ans)
    return ans.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


# Math. Every pattern is linear: whitespace runs are one character long (_window) and no two quantifiers
# next to each other can take the same characters, except across one such character.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")
_ANSWER_IS = re.compile(r"(?i:final answer|the answer|answer)\s?(?:is\b|:)[\s:]*(.+)")
_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def extract_math_answer(text: str) -> str | None:
    """The final answer of a math completion (think block already removed): the last \\boxed{};
    else the last "answer is X" / "answer: X" (to the end of its line); else the last number."""
    text = _window(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed or None
    phrases = list(_ANSWER_IS.finditer(text))
    if phrases:
        ans = phrases[-1].group(1).strip().rstrip(".").strip().strip("$*").strip()
        if ans:
            return ans
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _plain_number(ans: str) -> float | None:
    """A number written out plainly ("1,234.5", "$18.90", "\\$7"), or None for anything else (fractions,
    expressions and units go to math-verify)."""
    ans = re.sub(r"\\\$|\$|\\!", "", ans).strip()
    return float(ans.replace(",", "")) if _PLAIN_NUMBER.fullmatch(ans) else None


def _score_math(body: str, gold: str, tolerance: float | None) -> tuple[float, str | None, str]:
    ans = extract_math_answer(body)
    if ans is None:
        return 0.0, None, "no_answer"
    if hostile_reason(ans):
        return 0.0, ans[:80], "filtered"
    if _normalize_math(ans) == _normalize_math(gold):
        return 1.0, ans, "ok"
    if tolerance is not None and (x := _plain_number(ans)) is not None and (g := _plain_number(gold)) is not None:
        return float(abs(x - g) < tolerance), ans, "ok"
    ok = _VERIFIER.verify("\\boxed{" + gold + "}", "\\boxed{" + ans + "}", VERIFY_TIMEOUT_S)
    if ok is None:
        return 0.0, ans, "timeout"
    return float(ok), ans, "ok"


# Multiple choice. An answer mark is a letter standing alone: "C", "(C)", "[C]", "C." or "C)";
# lower case only in brackets ("(c)") or ending a line ("the answer is c"), so that ordinary words
# ("a", "A patient") never count. Groups: 1 bracketed, 2 a bare capital, 3 a lower-case letter.
_MARK = (r"[*_`$\s]*(?:\\(?:boxed|text|textbf|mathrm)\{\s?)?"
         r"(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?![A-Za-z0-9'\-])|([a-z])(?=[.)]?[ \t]?(?:\n|$)))")
_STATED = [re.compile(p) for p in (   # the letter may be the first word of an option's text: see _stated
    # "The answer is (C)", "Answer: C", "final answer: **C.**", "the answer would be option C"
    r"(?i:answer)[\s:=\-]*(?:(?i:is|would be|should be|must be)\b[\s:]*)?(?:(?i:option|choice|letter)\b[\s:]*)?"
    + _MARK,
    # "the correct option is C", "best choice: (C)"
    r"(?i:correct|right|best|final)\s(?i:option|choice)\b[\s:=]*(?:(?i:is|would be)\b[\s:]*)?" + _MARK,
)]
_EXPLICIT = _STATED + [re.compile(p) for p in (
    # "option C is correct", "(C) is the correct answer"
    r"(?:(?i:option|choice)\s?[(\[]?([A-Z])[)\]]?|[(\[]([A-Za-z])[)\]])\s(?i:is)\s(?i:the\s)?(?i:correct|right|best)",
    r"\\boxed\{\s?(?:\\text\{\s?)?\(?([A-Z])\)?",   # \boxed{C}
)]
_BOLD = re.compile(r"\*\*\s?[(\[]?([A-Z])[)\]]?(?:[.:)]|\*\*)")        # **C**, **C.** text, **(C) text**
_LEADING_MARK = re.compile(r"^[-*_`>\s]*(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?:[.:)]|\s?$))")  # "C", "(C) x", "- C. x"
_SAID = re.compile(r"(?i:answer)\s?(?i:is\b|:)[\s:]*(.+)")
# Text matching keeps every character that can tell two options apart: words and numbers (Greek letters
# included: "α2" / "β2"), and symbols such as + - ± → ↑ ("Rh+ve" / "Rh-ve"); it drops case and the
# punctuation that never does.
_TEXT_TOKEN = re.compile(r"\w+|[^\w\s.,;:!?'\"`()\[\]{}*]")


def _norm_text(s: str) -> str:
    return " ".join(_TEXT_TOKEN.findall(s.casefold()))


def _similarity(a: str, b: str) -> float:
    """difflib's ratio, skipped (0) where the lengths alone rule out 0.8, so its quadratic cost stays
    within the size of an option text."""
    if 3 * min(len(a), len(b)) < 2 * max(len(a), len(b)):
        return 0.0
    return difflib.SequenceMatcher(None, a, b).ratio()


def _option_by_text(candidate: str, options: dict) -> str | None:
    """The option whose text the candidate states: equal after normalisation, else a close
    difflib match (ratio >= 0.8, 0.1 ahead of the next), else the longest option text it contains."""
    cand = _norm_text(candidate)
    if not cand:
        return None
    texts = {k: _norm_text(v) for k, v in options.items()}
    for k, t in texts.items():
        if t and t == cand:
            return k
    ratios = sorted(((_similarity(cand, t), k) for k, t in texts.items() if t), reverse=True)
    if ratios and ratios[0][0] >= 0.8 and (len(ratios) == 1 or ratios[0][0] - ratios[1][0] >= 0.1):
        return ratios[0][1]
    contained = [k for k, t in texts.items() if len(t) >= 3 and f" {t} " in f" {cand} "]
    if contained:
        best = max(contained, key=lambda k: len(texts[k]))
        if all(texts[k] in texts[best] for k in contained):
            return best
    return None


def _stated(body: str, m: re.Match, letter: str, options: dict) -> str:
    """The option an "answer is X ..." statement names. A bare capital followed by more words may be the
    first word of an option's text ("The answer is A reduction in preload"): when an option's whole text
    (two words or more) opens the statement, that option is meant, not the letter."""
    if m.re not in _STATED or not m.group(2) or not body.startswith(" ", m.end(2)):
        return letter
    line_end = body.find("\n", m.end())
    said = " " + _norm_text(body[m.start(2):line_end if line_end >= 0 else len(body)]) + " "
    texts = {k: _norm_text(v) for k, v in options.items()}
    opening = [k for k, t in texts.items() if " " in t and said.startswith(" " + t + " ")]
    return max(opening, key=lambda k: len(texts[k])) if opening else letter


def _answer_part(body: str) -> tuple[str, bool]:
    """What the last <answer>...</answer> holds (or what follows an unclosed last <answer>, when generation
    stopped inside it); the whole body when there is no tag. Found with str.rfind: linear."""
    end = body.rfind("</answer>")
    start = body.rfind("<answer>", 0, end) if end >= 0 else -1
    if start >= 0:
        return body[start + len("<answer>"):end], True
    if "<answer>" in body:
        return body.rsplit("<answer>", 1)[1], True
    return body, False


def extract_choice(text: str, options: dict) -> str | None:
    """The option letter a completion picks, or None.

    Only the last <answer>...</answer> is read when there is one (or what follows an unclosed
    <answer>). Then, in order: the last explicit statement ("the answer is (C)", "Answer: C",
    "option C is correct", \\boxed{C}; "the answer is <an option's text>" names that option even when
    the text starts with a capital such as "A"); bold **C**, a reply or last line that starts with a
    mark ("C", "(C) Metformin", "C. Metformin"); the option's own text. A reply that walks through the
    options ("A. ... B. ...", "**A**: ... **B**: ...") names several letters, so only explicit
    statements and "the answer is <text>" count there. Only the last MAX_SCORED_CHARS are read.
    """
    body = strip_think(text)
    if body is None:
        return None
    body, tagged = _answer_part(body)
    body = _window(body).strip()
    if not body:
        return None

    def valid(m) -> str | None:
        g = next((g for g in m.groups() if g), None) if m else None
        return g.upper() if g and g.upper() in options else None

    explicit = [(m.start(), _stated(body, m, valid(m), options))
                for p in _EXPLICIT for m in p.finditer(body) if valid(m)]
    if explicit:
        return max(explicit)[1]
    lines = [ln for ln in body.splitlines() if ln.strip()]
    said = [m.group(1) for m in _SAID.finditer(body)]
    marked = [valid(_LEADING_MARK.match(ln)) for ln in lines]
    bold = [valid(m) for m in _BOLD.finditer(body)]
    if len(set(filter(None, marked + bold))) > 1:   # a walk through the options, not an answer
        return _option_by_text(said[-1], options) if said else None
    if bold and bold[-1]:
        return bold[-1]
    for candidate in (body, lines[-1]):
        if letter := valid(_LEADING_MARK.match(candidate)):
            return letter
    candidate = said[-1] if said else (body if tagged or len(body) <= 200 else lines[-1])
    return _option_by_text(candidate, options)


def _score_integer(completion: str, gold: str) -> tuple[float, str | None, str]:
    """The integer right after the last "=" (the whole completion if it has none)."""
    m = re.match(r"\s*(-?\d{1,100})(?!\d)", completion.rsplit("=", 1)[-1])
    if m is None:
        return 0.0, None, "no_answer"
    return float(int(m.group(1)) == int(gold)), m.group(1), "ok"


def score_one(bench: str, completion: str, example: dict) -> tuple[float, str | None, str]:
    """(reward, extracted answer or None, status) with status in ok | no_answer | filtered | timeout."""
    b = _bench(bench)
    if not isinstance(completion, str):
        raise ValueError(f"completion: expected str, got {type(completion).__name__}")
    gold = b.gold(example)
    if b.scorer == "integer":
        return _score_integer(completion[-MAX_SCORED_CHARS:], gold)
    if b.scorer == "choice":
        letter = extract_choice(completion, b.options(example))
        return float(letter == gold), letter, "ok" if letter else "no_answer"
    body = strip_think(completion)
    if body is None:
        return 0.0, None, "no_answer"
    return _score_math(body, gold, b.tolerance)


def score(bench: str, completion: str, example: dict) -> float:
    """1.0 if the completion's final answer is correct for the example, else 0.0 (bounded time)."""
    return score_one(bench, completion, example)[0]


def score_batch(bench: str, completions: list[str], examples: list[dict]) -> tuple[list[float], dict]:
    """Rewards for parallel lists, and counters {"timeouts", "filtered", "no_answer"} for logging."""
    if len(completions) != len(examples):
        raise ValueError(f"completions ({len(completions)}) and examples ({len(examples)}) differ in length")
    results = [score_one(bench, c, e) for c, e in zip(completions, examples)]
    status = Counter(s for _, _, s in results)
    counters = {"timeouts": status["timeout"], "filtered": status["filtered"], "no_answer": status["no_answer"]}
    return [r for r, _, _ in results], counters


# ----------------------------------------------------------------------------------------------
# 3. Metrics

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): pass@k = 1 - C(n-c, k) / C(n, k),
    the chance that k of the n drawn without replacement hold one correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(extracted: list, correct: list) -> float:
    """maj@n: correctness of the most frequent extracted answer (ties: the first seen); 0 if none."""
    keys = [_normalize_math(a) if a is not None else None for a in extracted]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return 0.0
    top = max(votes, key=lambda k: (votes[k], -keys.index(k)))
    return float(correct[keys.index(top)])


def summarize(rows: list[dict], n: int) -> dict:
    """Accuracy (mean over all samples), and for n > 1 mean@n, pass@k (k = 1, 2, 4, ..., n), maj@n."""
    if not rows:
        raise ValueError("summarize: no rows")
    m = {"examples": len(rows), "n": n,
         "accuracy": sum(sum(r["correct"]) / n for r in rows) / len(rows)}
    if n > 1:
        m[f"mean@{n}"] = m["accuracy"]
        for k in sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n}):
            m[f"pass@{k}"] = sum(pass_at_k(n, sum(r["correct"]), k) for r in rows) / len(rows)
        m[f"maj@{n}"] = sum(majority_correct(r["extracted"], r["correct"]) for r in rows) / len(rows)
    status = Counter(s for r in rows for s in r["status"])
    m.update(timeouts=status["timeout"], filtered=status["filtered"], no_answer=status["no_answer"])
    m["truncated_frac"] = sum(sum(r["truncated"]) for r in rows) / (n * len(rows))
    m["mean_response_tokens"] = sum(sum(r["response_tokens"]) for r in rows) / (n * len(rows))
    return m


# ----------------------------------------------------------------------------------------------
# 4. Evaluation: generate through rollout.sample, score, gather over ranks

def evaluate(model, tokenizer, bench: str, examples: list[dict], *, n: int = 1, temperature: float = 0.0,
             max_new_tokens: int = 512, batch_size: int = 32, thinking: bool = False, seed: int = 0,
             progress: bool = True, kv_budget: int | None = None, page_size: int = 128,
             compile_decode: bool = False) -> tuple[dict, list[dict]]:
    """Generate n completions per example (greedy at temperature 0) and score them.

    Returns (summary, rows); rows are one per example, in the order of `examples`: index, prompt,
    gold, and per sample lists completions, extracted, correct, status, response_tokens, truncated.
    An example's samples are keyed by its index (rollout.sample's prompt_keys), so they are the same
    whatever the batch size and the number of ranks. Under torch.distributed each rank takes examples
    rank::world and all ranks get the summary; rank 0 gets all rows, the others an empty list. The
    model's train/eval mode is restored.
    """
    import torch
    import rollout
    from tqdm.auto import tqdm

    _check_evaluate_args(bench, examples, n, temperature, max_new_tokens, batch_size)
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    prompts = [prompt_ids(bench, ex, tokenizer, thinking) for ex in examples]   # all of them: one verdict on every rank
    _check_context(model, prompts, max_new_tokens)
    mine = list(range(rank, len(examples), world))
    if kv_budget is None and next(model.parameters()).device.type == "cuda":  # sized by the memory free now
        kv_budget = rollout.default_kv_budget(model, rows=batch_size * n)
    cfg = rollout.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0,
                                 kv_budget=kv_budget, page_size=page_size, compile=compile_decode)
    eos, pad = rollout.eos_token_ids(model, tokenizer), tokenizer.pad_token_id

    was_training, t0, rows = model.training, time.time(), []
    model.eval()
    bar = tqdm(total=len(examples), desc=f"eval {bench}", disable=not progress or rank != 0, dynamic_ncols=True)
    try:
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            ro = rollout.sample(model, [prompts[i] for i in idx], n, cfg, eos_token_ids=eos, pad_token_id=pad,
                                seed=seed, prompt_keys=idx)
            rows += _scored_rows(bench, examples, prompts, idx, ro, tokenizer, n)
            bar.update(len(idx) * world)
    finally:
        bar.close()
        model.train(was_training)
    if distributed and world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    summary = {"bench": bench, **summarize(rows, n), "temperature": temperature,
               "max_new_tokens": max_new_tokens, "thinking": thinking, "seconds": round(time.time() - t0, 2)}
    return summary, (rows if rank == 0 else [])


def _scored_rows(bench: str, examples: list[dict], prompts: list, idx: list[int], ro, tokenizer, n: int) -> list[dict]:
    """One output row per example of the batch: its n decoded completions and their scores."""
    lengths = ro.response_mask.sum(1).tolist()               # [B], B = len(idx) * n
    responses = ro.response_ids.tolist()                     # [B, T]
    finished = ro.finished.tolist()                          # [B]
    rows = []
    for p, i in enumerate(idx):
        row = {"index": i, "prompt": tokenizer.decode(prompts[i]), "gold": _bench(bench).gold(examples[i]),
               "completions": [], "extracted": [], "correct": [], "status": [], "response_tokens": [], "truncated": []}
        for r in range(p * n, p * n + n):
            text = tokenizer.decode(responses[r][:lengths[r]], skip_special_tokens=True)
            reward, extracted, status = score_one(bench, text, examples[i])
            row["completions"].append(text)
            row["extracted"].append(extracted)
            row["correct"].append(reward == 1.0)
            row["status"].append(status)
            row["response_tokens"].append(int(lengths[r]))
            row["truncated"].append(not finished[r])
        rows.append(row)
    return rows


def _check_evaluate_args(bench, examples, n, temperature, max_new_tokens, batch_size) -> None:
    _bench(bench)
    if n < 1:
        raise ValueError(f"n {n}: must be at least 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature {temperature}: must be a finite number >= 0")
    if temperature == 0 and n > 1:
        raise ValueError(f"n {n}: greedy decoding (temperature 0) gives n identical samples; set temperature > 0")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size {batch_size} and max_new_tokens {max_new_tokens}: must be at least 1")
    if not examples:
        raise ValueError("examples: empty")


def _check_context(model, prompts: list[list[int]], max_new_tokens: int) -> None:
    """The longest prompt and the response budget must fit the model's context, checked before any generation."""
    n_ctx = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if n_ctx is not None and len(prompts[longest]) + max_new_tokens > n_ctx:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: example {longest}'s prompt has {len(prompts[longest])} "
                         f"tokens, and together they exceed the model's context of {n_ctx} tokens")


# ----------------------------------------------------------------------------------------------
# 5. Loading rows: synthetic, local file, hub; every row checked

SYNTHETIC_ROWS = {"train": 5000, "test": 500}   # rows generated when no --limit is given


def _synthetic_split(question: str) -> str:
    """Every question belongs to one split for good, whatever the seed: 1 in 10 by hash is "test"."""
    return "test" if int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 10 == 0 else "train"


def _chain_solution(terms: list[int]) -> str:
    """"12+34=46;46+56=102;102+7=109": each step adds the next term to the running sum."""
    steps, total = [], terms[0]
    for t in terms[1:]:
        steps.append(f"{total}+{t}={total + t}")
        total += t
    return ";".join(steps)


def synthetic_examples(bench: str, split: str, count: int, seed: int = 0) -> list[dict]:
    """Rows {question, answer, solution} of "add" (two 2-digit terms) or "chain" (3-4 terms of 1-99).

    Deterministic in (bench, split, count, seed); distinct questions; train and test never share a
    question (split by a hash of the question). `solution` is the target completion (without EOS)
    for a supervised warm start.
    """
    if bench == "add":   # 8,100 questions in all: enumerate them, keep the split's, draw in seeded order
        pool = [f"{a}+{b}=" for a in range(10, 100) for b in range(10, 100)]
        pool = [q for q in pool if _synthetic_split(q) == split]
        random.Random(seed).shuffle(pool)
        if count > len(pool):
            raise ValueError(f"limit {count}: the add task has only {len(pool)} {split} questions")
        rows = []
        for q in pool[:count]:
            a, b = map(int, q[:-1].split("+"))
            rows.append({"question": q, "answer": str(a + b), "solution": str(a + b)})
        return rows
    rng, seen, rows = random.Random(f"chain-{seed}"), set(), []
    while len(rows) < count:
        terms = [rng.randint(1, 99) for _ in range(rng.randint(3, 4))]
        q = "+".join(map(str, terms)) + "="
        if q in seen or _synthetic_split(q) != split:
            continue
        seen.add(q)
        rows.append({"question": q, "answer": str(sum(terms)), "solution": _chain_solution(terms)})
    return rows


def load_examples(bench: str, split: str = "test", data: str | None = None, limit: int | None = None,
                  seed: int = 0, flag: str = "--data") -> list[dict]:
    """Rows in the dataset's own schema: generated (synthetic), read from the file `data`, or from the hub.

    Every row is checked now (question, options, gold answer), so a bad row stops the run before a model
    loads, named by file and line. `limit` keeps the first N rows, after a seeded shuffle for benches drawn
    at random (MATH). mmlu-medical keeps its six medical subjects (a whole-MMLU file can be passed);
    medmcqa reads both cop codings (_medmcqa_zero_based). `flag` names the file in messages (train.py
    reads its validation file with --val-data).
    """
    b = _bench(bench)
    if split not in b.splits:
        raise ValueError(f"split {split!r}: bench {bench} has {', '.join(b.splits)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit {limit}: must be at least 1")
    if b.source == "synthetic" and data is None:
        return synthetic_examples(bench, split, limit or SYNTHETIC_ROWS[split], seed)
    if data is not None:
        source = f"{flag} {data}"
        rows, where = _read_file(data, source, csv_ok=bench == "mmlu-medical")
    else:
        source = f"{b.source} ({b.splits[split]} split)"
        rows = _hub_rows(bench, b, split, None if b.shuffle else limit, flag)
        where = [f"row {i + 1}" for i in range(len(rows))]
    if bench == "mmlu-medical":
        rows, where = _medical_only(rows, where, source)
    if bench == "medmcqa" and data is not None:   # the hub's coding is known: 0-3
        rows = _medmcqa_zero_based(rows, where, source)
    _check_rows(b, rows, where, source)
    if b.shuffle:
        random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit else rows
    if not rows:
        raise ValueError(f"{source}: no rows" + (" of the medical subjects" if bench == "mmlu-medical" else ""))
    return rows


def _check_rows(b: Bench, rows: list, where: list[str], source: str) -> None:
    """Each row's question, options and gold answer, or a message naming the file and the row."""
    for row, at in zip(rows, where):
        try:
            if not isinstance(row, dict):
                raise ValueError(f"a {type(row).__name__}, not an object of named fields")
            b.question(row)
            b.gold(row)
        except KeyError as e:
            raise ValueError(f"{source}: {at}: missing field {e}") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}: {at}: {e}") from None


def _medmcqa_zero_based(rows: list[dict], where: list[str], source: str) -> list[dict]:
    """MedMCQA rows with cop coded 0-3, the hub's coding (a ClassLabel named a, b, c, d).

    The original release (github.com/medmcqa/medmcqa) codes cop 1-4: its README says "cop: Correct option,
    i.e., 1,2,3,4" and its loader subtracts 1. A file is read as 1-4 when its cop values lie in 1..4 with a
    4 among them and no 0 (a 4 is impossible in 0-3), and converted with a printed note; as 0-3 when they
    lie in 0..3 with a 0 among them (a 0 is impossible in 1-4). Values all within 1..3 fit both codings,
    and a wrong guess would move every gold one letter without a sign, so such a file is refused: a real
    split holds thousands of rows with every answer, so only a file cut to a few rows is ambiguous, and
    writing cop as a letter (a-d) settles it. A file with both 0 and 4 fits neither coding. Rows without
    an integer cop are left to the row check.
    """
    cops = [r.get("cop") if isinstance(r, dict) else None for r in rows]
    cops = [int(c) if isinstance(c, (int, float)) and not isinstance(c, bool) and float(c).is_integer() else None
            for c in cops]   # an integer index, or None (a letter, a bad value: left to the row check)
    ints = {c for c in cops if c is not None}
    if 0 in ints and 4 in ints:
        at = where[next(i for i, c in enumerate(cops) if c == 4)]
        raise ValueError(f"{source}: {at}: cop 4 in a file that also has cop 0; neither MedMCQA's 0-3 coding "
                         "(the hub's) nor its 1-4 coding (the original release's) allows both")
    if not ints or not ints <= {0, 1, 2, 3, 4}:
        return rows   # letters only, or a value out of both ranges, which the row check names
    if ints <= {1, 2, 3}:
        raise ValueError(f"{source}: every cop value lies in 1..3, which fits both MedMCQA's 0-3 coding (the hub's) "
                         "and its 1-4 coding (the original release's); write cop as a letter a-d, or load more rows")
    if 4 not in ints:
        return rows
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {source}: cop runs 1..4, the original MedMCQA release's coding; read as 1 = A .. 4 = D",
              file=sys.stderr)
    return [dict(r, cop=c - 1) if c is not None else r for r, c in zip(rows, cops)]


def _medical_only(rows: list, where: list[str], source: str) -> tuple[list, list]:
    """The rows of MMLU's six medical subjects. A row without a subject cannot be placed, and MMLU's
    other 51 subjects would score as medicine, so a file without the field is refused."""
    missing = [at for row, at in zip(rows, where) if not isinstance(row, dict) or not row.get("subject")]
    if missing:
        what = "has no subject field" if len(missing) == len(rows) else f"lacks the subject field at {missing[0]}"
        raise ValueError(f"{source}: the file {what}, so its rows cannot be kept to the medical subjects "
                         f"({', '.join(MEDICAL_SUBJECTS)}); add the column, or pass MMLU's own per-subject CSV "
                         "files, whose names (SUBJECT_test.csv) say the subject")
    kept = [(row, at) for row, at in zip(rows, where) if row["subject"] in MEDICAL_SUBJECTS]
    return [row for row, _ in kept], [at for _, at in kept]


def read_rows(path: str) -> list[dict]:
    """Rows of a local .json (a list, or an object holding one list), .jsonl, .parquet or (MMLU) .csv file."""
    return _read_file(path, f"--data {path}", csv_ok=True)[0]


def _read_file(path: str, source: str, csv_ok: bool) -> tuple[list, list[str]]:
    """Rows of a local file, and where each one is ("line 7", "row 7") for messages."""
    if not os.path.isfile(path):
        raise ValueError(f"{source}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:   # pyarrow raises ArrowInvalid, OSError, ... for a file that is not parquet
            raise ValueError(f"{source}: not a readable parquet file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        return rows, [f"row {i + 1}" for i in range(len(rows))]
    if ext == ".csv":
        if not csv_ok:
            raise ValueError(f"{source}: a .csv file is read for --bench mmlu-medical only (MMLU's own format)")
        return _read_mmlu_csv(path, source)
    if ext not in (".json", ".jsonl"):
        raise ValueError(f"{source}: expected a .json, .jsonl or .parquet file (or, for mmlu-medical, .csv)")
    return _read_json(_read_text(path, source), source)


def _read_text(path: str, source: str) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{source}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r})") from None


def _read_json(text: str, source: str) -> tuple[list, list[str]]:
    """A JSON list of rows, an object holding one such list, one row, or JSON lines (one row a line)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as whole:
        lines = text.split("\n")   # not splitlines(): JSON strings may hold U+2028 and other line breaks
        first = next((ln for ln in lines if ln.strip()), "")
        try:
            json_lines = isinstance(json.loads(first), dict)
        except json.JSONDecodeError:
            json_lines = False
        if not json_lines:
            raise ValueError(f"{source}: not JSON: {whole.msg} at line {whole.lineno} column {whole.colno}") from None
        rows, where = [], []
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{source}: line {number} is not JSON: {e.msg} at column {e.colno}") from None
                where.append(f"line {number}")
        return rows, where
    if isinstance(obj, dict):
        held = [v for v in obj.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        obj = held[0] if len(held) == 1 else [obj]
    if not isinstance(obj, list):
        raise ValueError(f"{source}: expected a list of objects (rows), got a {type(obj).__name__}")
    return obj, [f"row {i + 1}" for i in range(len(obj))]


def _read_mmlu_csv(path: str, source: str) -> tuple[list[dict], list[str]]:
    """MMLU's CSV files as cais/mmlu rows {question, choices, answer, subject}. Hendrycks' originals have no
    header (question, the choices, the answer letter) and one file per subject, named SUBJECT_test.csv
    (or _dev, _val); common re-exports have a header (question, choice0..3 or A..D, answer as an index or a
    letter, and maybe subject). The subject comes from its column, else from the file name."""
    import csv
    import io
    reader = csv.reader(io.StringIO(_read_text(path, source), newline=""))
    named = re.fullmatch(r"(.+?)_(?:test|dev|val|validation)\.csv", os.path.basename(path))
    records, where, start = [], [], 1
    for rec in reader:
        if any(c.strip() for c in rec):
            records.append([c.strip() for c in rec])
            where.append(f"line {start}")
        start = reader.line_num + 1
    header = [c.lower() for c in records[0]] if records else []
    width = len(header)
    if "question" in header:
        choices = [i for i, c in enumerate(header) if re.fullmatch(r"choice_?\d|[a-j]|option_?[a-j\d]", c)]
        if "answer" not in header or len(choices) < 2:
            raise ValueError(f"{source}: a header with 'question' needs 'answer' and choice0..N (or A..D) columns")
        q, a = header.index("question"), header.index("answer")
        s = header.index("subject") if "subject" in header else None
        records, where = records[1:], where[1:]
    else:
        q, a, s, choices = 0, width - 1, None, list(range(1, width - 1))
    rows = []
    for rec, at in zip(records, where):
        if len(rec) != width or width < 4:
            raise ValueError(f"{source}: {at}: {len(rec)} columns; expected {width}: a question, options and an answer")
        answer = rec[a]
        row = {"question": rec[q], "choices": [rec[i] for i in choices],
               "answer": int(answer) if answer.isdigit() else answer}
        subject = rec[s] if s is not None else (named.group(1) if named else None)
        rows.append(dict(row, subject=subject) if subject else row)
    return rows, where


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub instead of datasets' retry loop (skipped behind a proxy)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    name, _, port = host.partition(":")
    try:
        socket.create_connection((name, int(port or 443)), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_hub_model(model: str, flag: str = "--model") -> None:
    """A hub id with the hub out of reach fails now, in a second, instead of after transformers' minute of retries.
    (HF_HUB_OFFLINE=1 skips the check: the id is then read from the local cache.)"""
    if model != "tiny" and not os.path.isdir(model) and not _offline() and not _hub_reachable():
        raise ValueError(f"{flag} {model}: the Hugging Face hub is unreachable; pass {flag} PATH to a local copy "
                         "(a directory with config.json), or set HF_HUB_OFFLINE=1 to use a copy in the hub's cache")


def _hub_rows(bench: str, b: Bench, split: str, first: int | None, flag: str) -> list[dict]:
    """All rows of the split (the first `first` of each config, when only those will be kept). `flag` names the
    option that gives this split a local file instead (train.py's validation split: --val-data)."""
    hint = (f"Pass {flag} PATH (a local json/jsonl/parquet file of the {split} split in the {b.source} schema), or "
            "download it where the hub is reachable; with HF_HUB_OFFLINE=1 a cached copy is used.")
    if not _offline() and not _hub_reachable():
        raise SystemExit(f"bench {bench} ({split} split): the Hugging Face hub is unreachable. {hint}")
    import datasets
    rows = []
    try:
        for config in b.configs:
            ds = datasets.load_dataset(b.source, config, split=b.splits[split])
            rows += (ds.select(range(min(first, len(ds)))) if first else ds).to_list()
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        first_line = str(e).splitlines()[0][:200] if str(e) else ""
        raise SystemExit(f"bench {bench}: could not load {b.source} ({type(e).__name__}: {first_line}). "
                         f"{hint}") from None
    return rows


# ----------------------------------------------------------------------------------------------
# 6. The command

@dataclass
class Args:
    bench: str = "medqa"
    """benchmark, or several comma-separated: math, math500, gsm-hard, amc23, medqa, medmcqa, mmlu-medical, add,
    chain"""
    model: str = "Qwen/Qwen3-1.7B"
    """hub id, local directory (a train.py checkpoint included), or `tiny` (random offline Qwen3)"""
    data: str | None = None
    """local .json/.jsonl/.parquet file in the benchmark's own schema (or MMLU's .csv), instead of the hub"""
    split: str = "test"
    """train or test"""
    limit: int | None = None
    """evaluate the first N examples only (MATH: N drawn at random with --seed, as the paper did)"""
    n: int = 1
    """samples per example; n > 1 reports mean@n, pass@k and maj@n (needs --temperature > 0). Under torchrun put
    `--` before evaluate.py, or torchrun takes --n for one of its own flags"""
    temperature: float = 0.0
    """0 = greedy (the papers' validation setting)"""
    max_new_tokens: int = 2048
    """response budget in tokens (the papers': 2,048)"""
    batch_size: int = 32
    """prompts per generation batch (each with n samples); the samples do not depend on it"""
    kv_budget: int | None = None
    """most KV-cache token positions while generating (None: from free GPU memory on CUDA, unbounded on CPU)"""
    page_size: int = 128
    """KV-cache positions per page while generating (rollout.SamplingConfig.page_size)"""
    compile_decode: bool = False
    """run the decode step under torch.compile (CUDA graphs on GPU)"""
    thinking: bool = False
    """Qwen3 thinking mode (off: the 2,048-token budget truncates most thinking; MedQA has its own <think> format)"""
    out: str = "runs/eval"
    """output directory for BENCH.json (summary) and BENCH.jsonl (one row per example)"""
    device: str = "auto"
    """cuda, cuda:N, cpu, ... (auto: this rank's GPU if there is one)"""
    dtype: str = "auto"
    """fp32, bf16 or fp16 (auto: bf16 on GPU, fp32 on CPU)"""
    seed: int = 0
    """seed of the sampler and of random draws"""
    progress: bool = True
    """show a progress bar"""


def main(argv: list[str] | None = None) -> dict:
    """Run the command; returns {bench: summary} (on every rank)."""
    args = parse_args(argv)
    examples = {name: load_examples(name, args.split, args.data, args.limit, args.seed)
                for name in args.bench.split(",")}   # data problems surface before torch is imported
    _prepare_out(args.out)
    import torch
    import rollout

    device = rollout.setup_device(args.device)  # under torchrun: the process group too
    dtype = rollout.compute_dtype(args.dtype, device)
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_initialized() else 0
    model, tokenizer = rollout.load_model_and_tokenizer(args.model, device=device, dtype=dtype, seed=args.seed)
    results = {}
    for name, rows_in in examples.items():
        summary, rows = evaluate(model, tokenizer, name, rows_in, n=args.n, temperature=args.temperature,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                 thinking=args.thinking, seed=args.seed, progress=args.progress,
                                 kv_budget=args.kv_budget, page_size=args.page_size,
                                 compile_decode=args.compile_decode)
        summary.update(model=args.model, split=args.split, data=args.data)
        results[name] = summary
        if rank == 0:
            print(json.dumps(summary), flush=True)   # first: a failed write below loses nothing of the result
            _write_outputs(args.out, name, summary, rows)
            print(f"wrote {os.path.join(args.out, name)}.json (summary) and .jsonl (one row per example)", flush=True)
    if dist.is_initialized():
        dist.barrier()   # tear down together: a rank leaving early can abort its peer in gloo
        dist.destroy_process_group()
    return results


def _write_outputs(out: str, name: str, summary: dict, rows: list[dict]) -> None:
    path = os.path.join(out, f"{name}.json")
    try:
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
        path = os.path.join(out, f"{name}.jsonl")
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise ValueError(f"--out {out}: could not write {path} ({e.strerror or e}); "
                         "the summary is printed above") from None


def field_docs(cls) -> tuple[dict[str, str], dict[str, str]]:
    """({field: its help}, {field: its group}), read from the dataclass's source: the help is the field's trailing
    `# comment` or the docstring under it; the group, the title of the `# --- title` comment above it."""
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    body = ast.parse("\n".join(lines)).body[0].body
    docs = {a.target.id: b.value.value.strip() for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    groups, title = {}, "options"
    for line in lines:
        m = re.match(r"\s*# --- (.+)|\s*(\w+): [^#]*(?:#\s*(.*))?$", line)
        if m and m[1]:
            title = m[1]
        elif m and m[2] in {a.target.id for a in body if isinstance(a, ast.AnnAssign)}:
            groups[m[2]] = title
            docs.setdefault(m[2], (m[3] or "").strip())
    return docs, groups


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: a mistyped flag names the flag it is closest to, with no usage dump."""

    def error(self, message: str):
        flags = [o for a in self._actions for o in a.option_strings]
        typo = re.match(r"unrecognized arguments: (-[^\s=]+)", message)
        close = difflib.get_close_matches(typo[1], flags, n=1, cutoff=0.6) if typo else []
        hint = f" (did you mean {close[0]}?)" if close else "" if typo is None else " (--help lists the flags)"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


def dataclass_parser(cls, description: str) -> argparse.ArgumentParser:
    """One --flag-name per field of the dataclass `cls` (train.py and the benchmarks build theirs here too),
    typed by its annotation (bool: --x / --no-x; X | None: X; list[X]: one or more X), its docstring as
    the help, grouped in --help by the `# --- title` comments of the dataclass. Flags not given are left out
    of the namespace (argparse.SUPPRESS), so `cls(**{**preset, **vars(namespace)})` layers: field defaults,
    then a preset, then the flags given."""
    parser = _Parser(description=description, usage="%(prog)s [options]", argument_default=argparse.SUPPRESS,
                     allow_abbrev=False)
    hints, (docs, titles) = typing.get_type_hints(cls), field_docs(cls)
    groups = {}
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        title = titles.get(f.name, "options")
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        doc = docs[f.name] + ("" if "default" in docs[f.name] else f" (default: {default})")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=doc)
            continue
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:  # X | None -> X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        nargs = None
        if typing.get_origin(kind) is list:
            kind, nargs = typing.get_args(kind)[0], "+"
        group.add_argument(flag, type=kind, nargs=nargs, help=doc)
    return parser


def build_parser() -> argparse.ArgumentParser:
    return dataclass_parser(Args, __doc__.splitlines()[0])


def parse_args(argv: list[str] | None = None) -> Args:
    """Parse and check every argument (a ValueError naming the flag) before anything loads."""
    import rollout  # its dtype names (rollout imports torch; this module does not, at import time)
    args = Args(**vars(build_parser().parse_args(argv)))
    benches = args.bench.split(",")
    for name in benches:
        if name not in BENCHES:
            raise ValueError(f"--bench {name!r}: unknown; choose from {', '.join(BENCHES)}")
        if args.split not in BENCHES[name].splits:
            raise ValueError(f"--split {args.split}: bench {name} has {', '.join(BENCHES[name].splits)}")
    if args.data is not None:
        if len(benches) > 1:
            raise ValueError("--data: one file serves one bench; give a single --bench")
        if not os.path.isfile(args.data):
            raise ValueError(f"--data {args.data!r}: no such file")
    for flag, value in (("--limit", args.limit), ("--n", args.n), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens), ("--kv-budget", args.kv_budget),
                        ("--page-size", args.page_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature {args.temperature}: must be a finite number >= 0")
    if args.temperature == 0 and args.n > 1:
        raise ValueError(f"--n {args.n}: greedy decoding gives identical samples; set --temperature > 0")
    if not 0 <= args.seed < 2 ** 63:
        raise ValueError(f"--seed {args.seed}: must be in [0, 2^63)")
    if args.dtype != "auto" and args.dtype not in rollout.DTYPES:
        raise ValueError(f"--dtype {args.dtype}: choose auto, {', '.join(rollout.DTYPES)}")
    if not re.fullmatch(r"auto|cpu|mps|(?:cuda|xpu)(?::\d+)?", args.device):
        raise ValueError(f"--device {args.device}: expected auto, cpu, cuda, cuda:N, mps or xpu")
    _check_out(args.out)
    check_hub_model(args.model)
    return args


def _check_out(out: str) -> None:
    """--out must be a directory or creatable as one (checked again by writing, in _prepare_out)."""
    if not out:
        raise ValueError("--out: empty")
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f"--out {out}: {path} is a file, not a directory")


def _prepare_out(out: str) -> None:
    """Create --out and write a probe file in it, before a model loads: an unwritable place fails now,
    not after the whole evaluation (every rank checks, so all stop together)."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------
# Appendix A. Hostile answers: cheap checks that keep them away from sympy

MAX_ANSWER_CHARS = 400    # MATH answers are a few dozen characters; a 20k-term sum is not an answer
MAX_NESTING = 30          # bracket depth; sympy's parser recurses on it
MAX_EXPONENT_DIGITS = 6   # 2^{9999999999} is a 1.2 GB integer to sympy


def hostile_reason(ans: str) -> str | None:
    """Why an extracted answer must not reach sympy (cheap checks), or None if it may.

    The wall-clock bound on math-verify catches everything else; these only save the wait.
    """
    if len(ans) > MAX_ANSWER_CHARS:
        return "length"
    if "__" in ans:  # Python dunder access: no LaTeX answer has it; sympy's parse_expr uses eval
        return "dunder"
    depth = peak = 0
    for c in ans:
        depth += (c in "([{") - (c in ")]}")
        peak = max(peak, depth)
    if peak > MAX_NESTING:
        return "nesting"
    for m in re.finditer(r"\^|\*\*", ans):
        rest = ans[m.end():].lstrip()
        if rest.startswith("{"):
            expo, d = "", 0
            for c in rest:   # the braced exponent
                d += (c == "{") - (c == "}")
                expo += c
                if d == 0:
                    break
        else:
            expo = re.match(r"[^\s+\-*/=,)\]}]*", rest).group(0)
        if ("^" in expo or "**" in expo) and not re.search(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", expo)):
            return "exponent tower"   # numeric only: 2^{2^{100}}; e^{x^2} stays symbolic and is fine
        if any(len(n) > MAX_EXPONENT_DIGITS for n in re.findall(r"\d+", expo)):
            return "huge exponent"
    if re.search(r"\d{5,}\s*!", ans):
        return "huge factorial"
    return None


# ----------------------------------------------------------------------------------------------
# Appendix B. The math-verify child process: every equivalence check bounded by wall clock

VERIFY_TIMEOUT_S = 5.0    # wall clock per math-verify call (its own default timeout is 5 s too)
VERIFY_START_S = 120.0    # the child's imports (sympy) on a busy machine


def _verify_worker() -> None:
    """Body of the math-verify child process: one JSON request per stdin line {"gold", "pred"},
    one reply per stdout line {"ok": bool}. Runs math-verify with its SIGALRM timeouts off (the
    parent bounds the time) and its logging silenced (it prints whole strings on a timeout)."""
    out = os.fdopen(os.dup(1), "w")          # the reply channel; anything else printing goes nowhere
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    logging.disable(logging.CRITICAL)
    try:   # a blow-up becomes a MemoryError here rather than swapping the machine
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    except (ImportError, ValueError, OSError):
        pass
    parent = os.getppid()

    def orphan_watch():   # a parent that died mid-call never reads the reply: stop burning CPU
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=orphan_watch, daemon=True).start()
    from math_verify import parse, verify
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            ok = verify(parse(req["gold"], parsing_timeout=None), parse(req["pred"], parsing_timeout=None),
                        timeout_seconds=None)
        except BaseException:   # MemoryError, RecursionError, anything sympy throws: not equivalent
            ok = False
        out.write(json.dumps({"ok": bool(ok)}) + "\n")
        out.flush()


class _Verifier:
    """The parent's handle on one math-verify child, shared by all threads of this process.

    A lock serialises requests; a process that inherited the handle through fork starts its own.
    """

    def __init__(self):
        self.lock, self.proc, self.pid = threading.Lock(), None, os.getpid()
        atexit.register(self.close)

    def _start(self) -> None:
        # Load this file by path under its own name (no clash with any installed `evaluate` package).
        code = ("import importlib.util as u, sys; "
                "s = u.spec_from_file_location('evaluate_verify_worker', sys.argv[1]); "
                "m = sys.modules[s.name] = u.module_from_spec(s); s.loader.exec_module(m); m._verify_worker()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, os.path.abspath(__file__)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, close_fds=True)
        if self._read(VERIFY_START_S) is None:
            self.close()
            raise RuntimeError("the math-verify worker process did not start (is math-verify installed?)")

    def _read(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        return json.loads(line) if line else None

    def close(self) -> None:
        if self.proc is not None and self.pid == os.getpid():
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def verify(self, gold: str, pred: str, timeout: float) -> bool | None:
        """math-verify's verdict, or None when it ran past `timeout` seconds (the child is killed)."""
        if self.pid != os.getpid():   # forked: the parent's child and lock are not ours
            self.lock, self.proc, self.pid = threading.Lock(), None, os.getpid()
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            try:
                self.proc.stdin.write(json.dumps({"gold": gold, "pred": pred}) + "\n")
                self.proc.stdin.flush()
                reply = self._read(timeout)
            except (OSError, ValueError):
                reply = None
            if reply is None:
                self.close()   # a fresh child starts on the next call
                return None
            return reply["ok"]


_VERIFIER = _Verifier()


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:   # a user error: one line naming the flag, argparse's exit code
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
