"""evaluate.py: the benchmarks, their verifiable rewards (SPEC 7), and `python evaluate.py --bench medqa`.

`score(bench, completion, row)` is the one definition of "correct", for training and evaluation alike:
- math: the last `\\boxed{}` after Qwen3's `</think>` (else, more leniently than the papers, "answer is X" or the
  last number), equal to the gold by math-verify in a child process that bounds every call by wall clock;
- choice (medqa, medmcqa, mmlu-medical, gpqa-diamond): the option a completion states, by its letter or its text;
- integer (add and chain, offline synthetic tasks for the demo): the integer after the last "=".
Departures: MedQA's options go one per line, and our system prompt asks for <answer>C</answer> (the authors':
"A: x, B: y", only <answer> read); untagged forms such as "The answer is (C)" count too. Only a completion's last
MAX_SCORED_CHARS are read. Qwen3's thinking mode is off by default: it overruns the papers' 2,048 tokens.
"""
import argparse
import ast
import atexit
import dataclasses
import difflib
import hashlib
import inspect
import itertools
import json
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
import typing
from collections import Counter
from pathlib import Path

# ---- benchmarks (SPEC 7) ----

MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
CHOICE_SYSTEM = ("You answer a multiple-choice question. Reason step by step inside <think> </think> tags, then "
                 "give the letter of the single correct option inside <answer> </answer> tags, for example "
                 "<think> reasoning here </think><answer> C </answer>.")
MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
           "professional_medicine")
LETTERS = "ABCDEFGHIJ"


def _text(value, name: str) -> str:
    """A field as text: a number too (27.0 -> "27"), and a list of one value (OlympiadBench's final_answer)."""
    value = value[0] if isinstance(value, list) and len(value) == 1 else value
    value = int(value) if isinstance(value, float) and value.is_integer() else value
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or not str(value).strip():
        raise ValueError(f"field {name!r}: expected text, got {type(value).__name__} {str(value)[:60]!r}")
    return str(value).strip()


@dataclasses.dataclass(frozen=True)
class Bench:
    """A benchmark: where its rows come from, which fields of a row are asked and hold the answer, its scorer."""
    source: str                  # hub dataset id, or "synthetic" (generated offline)
    splits: dict                 # our split ("train"/"test") -> the hub's split name
    question: str                # the row's question field
    answer: str                  # the row's gold field (choice: an index, a letter or the option's text)
    scorer: str                  # "math" | "choice" | "integer"
    choices: tuple = ()          # choice: one field ({letter: text} or a list of texts), or a field per option
    configs: tuple = (None,)     # hub configs, loaded and concatenated
    shuffle: bool = False        # a seeded draw before --limit (the paper's random MATH split)
    tolerance: float | None = None   # math: a plain-number answer this close to the gold counts

    def options(self, row: dict) -> dict:
        """{letter: text}; options holding the gold (GPQA's) shuffled, the same way for a question in any process."""
        one = len(self.choices) == 1
        name, texts = (self.choices[0], row.get(self.choices[0])) if one else (
            f"{self.choices[0]}..{self.choices[-1]}", [row.get(f) for f in self.choices])
        if self.answer in self.choices:
            random.Random(str(row.get(self.question))).shuffle(texts)
        pairs = texts.items() if isinstance(texts, dict) else zip(LETTERS, texts) if isinstance(texts, list) else ()
        out = {k.strip().upper(): _text(v, f"{name}.{k}") for k, v in pairs if v is not None}   # parquet pads None
        if len(out) < 2 or not set(out) <= set(LETTERS):
            raise ValueError(f"field {name!r}: expected 2-10 options lettered A-J, got {str(texts)[:60]}")
        return out

    def ask(self, row: dict) -> str:
        """The user message: a math problem and the papers' instruction; a question and its options."""
        q = _text(row.get(self.question), self.question)
        if self.scorer == "choice":
            return q + "".join(f"\n{k}. {v}" for k, v in self.options(row).items())
        return q + " " + MATH_INSTRUCTION if self.scorer == "math" else q

    def gold(self, row: dict) -> str:
        """The reference answer: LaTeX (math), an option letter (choice) or an integer (synthetic)."""
        value = row.get(self.answer)
        if self.scorer == "choice":
            options = self.options(row)
            value = int(value) if isinstance(value, float) and value.is_integer() else value
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(options):
                return LETTERS[value]                               # cais/mmlu's answer, medmcqa's cop
            if len(found := [k for k, v in options.items() if str(value).strip() in (k, k.lower(), v)]) != 1:
                raise ValueError(f"field {self.answer!r}: {value!r} is neither an option letter "
                                 f"({''.join(options)}), an index 0..{len(options) - 1} nor an option's text")
            return found[0]
        gold = _text(value, self.answer)
        if self.scorer == "integer" and not re.fullmatch(r"-?\d{1,100}", gold):
            raise ValueError(f"field {self.answer!r}: {gold[:60]!r} is not an integer")
        if "\\boxed" in gold and not (gold := last_boxed(gold)):   # MATH's solution: its last box
            raise ValueError(f"field {self.answer!r}: no complete \\boxed{{}} answer in it")
        if "####" in gold:                                         # GSM8K's worked solution ends "#### 1,234"
            gold = gold.rsplit("####", 1)[1].strip().replace(",", "")
        return re.sub(r"^(-?\d+)\.0+$", r"\1", gold)                 # AMC23 stores 27 as "27.0"


TRAIN_TEST, TEST, TRAIN = {"train": "train", "test": "test"}, {"test": "test"}, {"test": "train"}
SUITES = {"math": ("math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench", "omni-math", "gsm8k",
                   "gsm-hard", "gpqa-diamond")}   # for TreeAdv's ten, whose list is not public (README says which)
BENCHES: dict[str, Bench] = {   # each in its hub dataset's own schema
    # MATH (lighteval): the gold is the solution's last box; drawn at random, as the paper
    "math": Bench("DigitalLearningGmbH/MATH-lighteval", TRAIN_TEST, "problem", "solution", "math", shuffle=True),
    "math500": Bench("HuggingFaceH4/MATH-500", TEST, "problem", "answer", "math"),
    # GSM-HARD's target is its program's float: within 1e-3 counts (PAL's gsm_eval.py); a relative tolerance would
    # be too loose for its large targets and too strict for a short decimal
    "gsm-hard": Bench("reasoning-machines/gsm-hard", TRAIN, "input", "target", "math", tolerance=1e-3),
    "amc23": Bench("math-ai/amc23", TEST, "question", "answer", "math"),   # answer 27.0 or ["27.0"]
    "medqa": Bench("Neelectric/MedQA-USMLE", TRAIN_TEST, "question", "answer_idx", "choice", ("options",)),
    "medmcqa": Bench("openlifescienceai/medmcqa", {"train": "train", "test": "validation"}, "question", "cop",
                     "choice", ("opa", "opb", "opc", "opd")),   # cop: the hub's ClassLabel a-d, 0-3
    "mmlu-medical": Bench("cais/mmlu", {"train": "validation", "test": "test"}, "question", "answer", "choice",
                          ("choices",), MEDICAL),   # a config per subject
    "aime24": Bench("HuggingFaceH4/aime_2024", TRAIN, "problem", "answer", "math"),   # answer "025"
    "aime25": Bench("math-ai/aime25", TEST, "problem", "answer", "math"),   # answer an integer
    "minerva": Bench("math-ai/minervamath", TEST, "question", "answer", "math"),   # "4.5e33", LaTeX
    "olympiadbench": Bench("Hothan/OlympiadBench", TRAIN, "question", "final_answer", "math",
                           configs=("OE_TO_maths_en_COMP",)),   # final_answer a list of one: "$k=1$", "1,3,5"
    "gsm8k": Bench("openai/gsm8k", TRAIN_TEST, "question", "answer", "math", configs=("main",)),   # "... #### 18"
    "omni-math": Bench("KbsdJames/Omni-MATH", TEST, "problem", "answer", "math"),   # a gold may be \[\boxed{..}\]
    "gpqa-diamond": Bench("Idavidrein/gpqa", TRAIN, "Question", "Correct Answer", "choice", ("Correct Answer",
                          "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"), ("gpqa_diamond",)),
    # offline: "12+34=" -> "46"; "12+34+56+7=" -> "109", solved as "12+34=46;46+56=102;102+7=109"
    "add": Bench("synthetic", TRAIN_TEST, "question", "answer", "integer"),
    "chain": Bench("synthetic", TRAIN_TEST, "question", "answer", "integer"),
}


def prompt_ids(bench: str, example: dict, tokenizer, thinking: bool = False) -> list[int]:
    """The chat template's ids (`thinking`: Qwen3's enable_thinking); the synthetic tasks' raw question."""
    b = BENCHES[bench]
    if b.scorer == "integer":   # the tiny character model: few tokens
        return tokenizer.encode(b.ask(example), add_special_tokens=False)
    chat = [{"role": "system", "content": CHOICE_SYSTEM}] if b.scorer == "choice" else []
    return list(tokenizer.apply_chat_template(chat + [{"role": "user", "content": b.ask(example)}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False, enable_thinking=thinking))


# ---- scorers: score(bench, completion, row) -> 1.0 | 0.0, in time linear in the completion ----

MAX_SCORED_CHARS = 4000   # the final answer and the sentences after it: ten times the longest answer let through


def _window(text: str) -> str:
    """The end of a completion, a whitespace run one character (so no pattern can split a run between quantifiers)."""
    return re.sub(r"\s+", lambda m: "\n" if "\n" in m.group(0) else " ", text[-MAX_SCORED_CHARS:])


def strip_think(text: str) -> str | None:
    """What follows the last </think>; None when a <think> was opened and never closed (no answer yet)."""
    return text.rsplit("</think>", 1)[1] if "</think>" in text else None if "<think>" in text else text


def last_boxed(text: str) -> str | None:
    """The last complete \\boxed{...} or \\fbox{...} (`\\boxed 5` too), or None; a stack pairs braces in one pass."""
    opening, found, stack = {}, [], []   # a box's "{" -> the box's start; (start, content) of closed boxes
    for m in re.finditer(r"\\(?:boxed|fbox)\b\s*", text):
        if text.startswith("{", m.end()):
            opening[m.end()] = m.start()
        elif m.group(0).endswith(" ") and (token := re.compile(r"[^\s$]+").match(text, m.end())):
            found.append((m.start(), token.group(0)))
    for m in re.finditer(r"\\.|[{}]", text, re.S) if opening else ():   # \{ \} \\ neither open nor close
        if m.group(0) == "{":
            stack.append(m.start())
        elif m.group(0) == "}" and stack and (i := stack.pop()) in opening:
            found.append((opening[i], text[i + 1:m.start()].strip()))
    return max(found)[1] if found else None


_ANSWER_IS = re.compile(r"(?i:final answer|the answer|answer)\s?(?:is\b|:)[\s:]*(.+)")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")


def extract_math_answer(text: str) -> str | None:
    """The last \\boxed{}; else the last "answer is X" / "answer: X" (to the end of its line); else the last number."""
    text = _window(text)
    if (boxed := last_boxed(text)) is not None:
        return boxed or None
    said = [m.group(1).strip().rstrip(".").strip().strip("$*").strip() for m in _ANSWER_IS.finditer(text)]
    numbers = _NUMBER.findall(text)
    return said[-1] if said and said[-1] else numbers[-1].replace(",", "") if numbers else None


def _normalize_math(ans: str) -> str:
    """Spacing, \\left/\\right and \\dfrac dropped: an exact-match shortcut and maj@n's vote, not correctness."""
    return re.sub(r"\\left|\\right|\\!|\\,|\\;|\s+", "", ans).replace("\\dfrac", "\\frac").replace(
        "\\tfrac", "\\frac").rstrip(".")


# Multiple choice. A mark is a letter standing alone: "(C)", "[C]", a capital followed by no letter or digit
# ("C", "C."), or a lower-case letter ending the statement ("the answer is c"); so "a" and "As" never count.
_MARK = re.compile(r"[*_`$\s]*(?:\\(?:boxed|text|textbf|mathrm)\{\s?)*(?:(?i:option|choice|letter)\s)?"
                   r"(?:[(\[]([A-Ja-j])[)\]]|([A-J])(?![\w'\-])|([a-j])[.)]?\s*$)")
_SAID = re.compile(r"(?:(?i:answer|option|choice)\s?(?:(?i:is|would be|should be|must be)\b|:)|\\boxed\{)[\s:*]*"
                   r"(?=(.{0,300}))")   # in a lookahead, bounded: a later statement on the line is found too
_NAMED = re.compile(r"(?:(?i:option|choice)\s?[(\[]?([A-J])[)\]]?|[(\[]([A-Ja-j])[)\]])\s(?i:is)\s(?i:the\s)?"
                    r"(?i:correct|right|best)")                                     # "option C is correct"
_LEADING = re.compile(r"[-*_`>\s]*(?:[(\[]([A-Ja-j])[)\]]|([A-J])(?:[.:)*]|\s?$))")   # "C", "**C**", "(C) x"
_TEXT_TOKEN = re.compile(r"\w+|[^\w\s.,;:!?'\"`()\[\]{}*]")   # keeps the symbols that tell "Rh+ve" from "Rh-ve"


def _by_text(said: str, options: dict, opening: bool = False) -> str | None:
    """The option whose text the statement is, opens with (`opening`) or contains: the longest, if it holds the rest."""
    def norm(t):
        return " " + " ".join(_TEXT_TOKEN.findall(t.casefold())) + " "

    s, texts = norm(said), {k: norm(v) for k, v in options.items()}
    hits = [k for k, t in texts.items() if s == t or (s.startswith(t) if opening else len(t) > 4 and t in s)]
    best = max(hits, key=lambda k: len(texts[k]), default=None)
    return best if best and all(texts[k] in texts[best] for k in hits) else None


def extract_choice(text: str, options: dict) -> str | None:
    """The option picked, within the last <answer>...</answer> if any: the last statement ("the answer is (C)", "option
    C is correct", "Answer: <an option's text>"), else the one letter that starts lines ("C", "**C**"), else a text."""
    def letter(m):
        return next((g.upper() for g in m.groups() if g), None) if m else None

    if (body := strip_think(text)) is None:
        return None
    start, end = body.rfind("<answer>"), body.rfind("</answer>")
    if tagged := start >= 0:
        body = body[start + len("<answer>"):end if end > start else None]
    body = _window(body).strip()
    said = [(m.start(), _by_text(m.group(1), options, opening=True) or letter(_MARK.match(m.group(1))))
            for m in _SAID.finditer(body)]
    if found := [(p, k) for p, k in said + [(m.start(), letter(m)) for m in _NAMED.finditer(body)] if k in options]:
        return max(found)[1]
    lines = [ln for ln in body.splitlines() if ln.strip()]
    if marked := {letter(_LEADING.match(ln)) for ln in lines} & set(options):
        return marked.pop() if len(marked) == 1 else None
    return _by_text(body if tagged or len(lines) <= 1 else lines[-1], options) if lines else None


def score_one(bench: str, completion: str, example: dict) -> tuple[float, str | None, str]:
    """(reward, extracted answer or None, status), status one of ok | no_answer | filtered | timeout."""
    def plain(s):   # a number written out plainly ("1,234.5", "$18.90"), else None
        s = re.sub(r"\\\$|\$|\\!", "", s).strip()
        return float(s.replace(",", "")) if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+", s) else None

    def latex(s):   # math-verify reads 4.5e33 as 4.5 e 33; a gold in $...$ (OlympiadBench's) is read as written
        s = re.sub(r"^(-?\d+(?:\.\d+)?)[eE]\+?(-?\d+)$", r"\1\\times10^{\2}", s)
        return s if re.search(r"(?<!\\)\$", s) else "\\boxed{" + s + "}"   # an unescaped $ (\$ is money)

    b = BENCHES[bench]
    gold = b.gold(example)
    if b.scorer == "integer":   # the integer right after the last "=" (the whole completion if it has none)
        m = re.match(r"\s*(-?\d{1,100})(?!\d)", completion[-MAX_SCORED_CHARS:].rsplit("=", 1)[-1])
        return (float(int(m.group(1)) == int(gold)), m.group(1), "ok") if m else (0.0, None, "no_answer")
    if b.scorer == "choice":
        letter = extract_choice(completion, b.options(example))
        return float(letter == gold), letter, "ok" if letter else "no_answer"
    if (body := strip_think(completion)) is None or (ans := extract_math_answer(body)) is None:
        return 0.0, None, "no_answer"
    if hostile_reason(ans):
        return 0.0, ans[:80], "filtered"
    if _normalize_math(ans) == _normalize_math(gold):
        return 1.0, ans, "ok"
    if b.tolerance is not None and (x := plain(ans)) is not None and (g := plain(gold)) is not None:
        return float(abs(x - g) < b.tolerance), ans, "ok"
    ok = _VERIFIER.verify(latex(gold), latex(ans), VERIFY_TIMEOUT_S)
    return (0.0, ans, "timeout") if ok is None else (float(ok), ans, "ok")


def score(bench: str, completion: str, example: dict) -> float:
    """1.0 if the completion's final answer is correct for the example, else 0.0."""
    return score_one(bench, completion, example)[0]


def score_batch(bench: str, completions: list[str], examples: list[dict]) -> tuple[list[float], dict]:
    """Rewards for parallel lists, and the counters {"timeouts", "filtered", "no_answer"} for logging."""
    results = [score_one(bench, c, e) for c, e in zip(completions, examples, strict=True)]
    return [r for r, _, _ in results], _counters(s for _, _, s in results)


def decode_responses(tokenizer, ro) -> tuple[list[str], list[int]]:
    """The text `score` reads, for training and evaluation alike: each rollout row's response up to its length,
    special tokens dropped; and the lengths in tokens."""
    lengths = ro.response_mask.sum(1).tolist()   # [B]
    texts = [tokenizer.decode(r[:n], skip_special_tokens=True) for r, n in zip(ro.response_ids.tolist(), lengths)]
    return texts, lengths


# ---- metrics ----

def _counters(statuses) -> dict:
    status = Counter(statuses)
    return {"timeouts": status["timeout"], "filtered": status["filtered"], "no_answer": status["no_answer"]}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k, n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(extracted: list, correct: list) -> float:
    """maj@n: the correctness of the most frequent extracted answer (ties: the first seen); 0 if none."""
    keys = [_normalize_math(a) if a is not None else None for a in extracted]
    votes = Counter(k for k in keys if k is not None)
    return float(correct[keys.index(max(votes, key=lambda k: (votes[k], -keys.index(k))))]) if votes else 0.0


def summarize(rows: list[dict], n: int) -> dict:
    """accuracy (over every sample: avg@n), pass@k (k = 1, 2, 4, ..., n) and maj@n when n > 1, the scorer's counters,
    the truncated share, mean response tokens, and tokens per correct solution (all tokens over the correct samples)."""
    def mean(key):   # over every sample
        return sum(sum(r[key]) for r in rows) / (n * len(rows))

    m = {"examples": len(rows), "n": n, "accuracy": mean("correct")}
    if n > 1:
        m[f"avg@{n}"] = m["accuracy"]
        for k in sorted({2 ** i for i in range(n.bit_length())} | {n}):
            m[f"pass@{k}"] = sum(pass_at_k(n, sum(r["correct"]), k) for r in rows) / len(rows)
        m[f"maj@{n}"] = sum(majority_correct(r["extracted"], r["correct"]) for r in rows) / len(rows)
    return {**m, **_counters(s for r in rows for s in r["status"]), "truncated_frac": mean("truncated"),
            "mean_response_tokens": mean("response_tokens"),
            "tokens_per_correct": mean("response_tokens") / m["accuracy"] if m["accuracy"] else None}


# ---- infrastructure ----

def evaluate(model, tokenizer, bench: str, examples: list[dict], *, n: int = 1, temperature: float = 0.0,
             max_new_tokens: int = 512, batch_size: int = 32, thinking: bool = False, seed: int = 0,
             progress: bool = True, kv_budget: int | None = None) -> tuple[dict, list[dict]]:
    """n scored completions per example, greedy at temperature 0: (summary, a row per example, on rank 0). Samples are
    keyed by the example's index, so the batch size and the ranks (each takes examples rank::world) change none."""
    import torch.distributed as dist
    import rollout
    from tqdm.auto import tqdm

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    prompts = [prompt_ids(bench, ex, tokenizer, thinking) for ex in examples]
    golds = [BENCHES[bench].gold(ex) for ex in examples]
    if kv_budget is None and next(model.parameters()).device.type == "cuda":   # sized by the memory free now
        kv_budget = rollout.default_kv_budget(model, rows=batch_size * n,
                                              longest=max(map(len, prompts)) + max_new_tokens)
    cfg = rollout.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0,
                                 kv_budget=kv_budget)
    eos, mine = rollout.eos_token_ids(model, tokenizer), list(range(rank, len(examples), world))
    was_training, t0, rows = model.training, time.time(), []
    model.eval()
    bar = tqdm(total=len(examples), desc=f"eval {bench}", disable=not progress or rank != 0, dynamic_ncols=True)
    try:
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            ro = rollout.sample(model, [prompts[i] for i in idx], n, cfg, eos_token_ids=eos,
                                pad_token_id=tokenizer.pad_token_id, seed=seed, prompt_keys=idx)
            decoded, lengths = decode_responses(tokenizer, ro)   # B = |idx| n rows
            finished = ro.finished.tolist()
            for p, i in enumerate(idx):
                own = range(p * n, p * n + n)
                texts = [decoded[r] for r in own]
                reward, extracted, status = zip(*(score_one(bench, t, examples[i]) for t in texts))
                rows.append({"index": i, "prompt": tokenizer.decode(prompts[i]), "gold": golds[i],
                             "completions": texts, "extracted": list(extracted), "status": list(status),
                             "correct": [r == 1 for r in reward], "response_tokens": [lengths[r] for r in own],
                             "truncated": [not finished[r] for r in own]})
            bar.update(len(idx) * world)
    finally:
        bar.close()
        model.train(was_training)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    summary = {"bench": bench, **summarize(rows, n), "temperature": temperature, "max_new_tokens": max_new_tokens,
               "thinking": thinking, "seconds": round(time.time() - t0, 2)}
    return summary, (rows if rank == 0 else [])


def synthetic_examples(bench: str, split: str, count: int, seed: int = 0) -> list[dict]:
    """Distinct rows {question, answer, solution (each running sum)} of "add" (two terms 10-99) or "chain" (3-4 terms
    1-99), fixed by (bench, split, count, seed); a question's split is fixed by its hash (1 in 10 is "test")."""
    def in_split(q):
        return ("test" if int(hashlib.sha256(q.encode()).hexdigest()[:8], 16) % 10 == 0 else "train") == split

    if bench == "add":   # 8,100 questions in all: enumerate them, keep the split's, draw in seeded order
        pool = [q for q in (f"{a}+{b}=" for a in range(10, 100) for b in range(10, 100)) if in_split(q)]
        random.Random(seed).shuffle(pool)
        if count > len(pool):
            raise ValueError(f"limit {count}: the add task has only {len(pool)} {split} questions")
        sums = [str(sum(map(int, q[:-1].split("+")))) for q in pool[:count]]
        return [{"question": q, "answer": total, "solution": total} for q, total in zip(pool, sums)]
    rng, seen, rows = random.Random(f"chain-{seed}"), set(), []
    while len(rows) < count:
        terms = [rng.randint(1, 99) for _ in range(rng.randint(3, 4))]
        q = "+".join(map(str, terms)) + "="
        if q not in seen and in_split(q):
            seen.add(q)
            sums = [sum(terms[:i + 1]) for i in range(len(terms))]
            rows.append({"question": q, "answer": str(sums[-1]),
                         "solution": ";".join(f"{s}+{t}={s + t}" for s, t in zip(sums, terms[1:]))})
    return rows


READERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}   # a file's datasets reader


def load_examples(bench: str, split: str = "test", data: str | None = None, limit: int | None = None,
                  seed: int = 0, flag: str = "--data") -> list[dict]:
    """Rows in the dataset's own schema (synthetic, the file `data` named as `flag`, or the hub), each checked now: a
    bad one is named by file and line. `limit`: the first N, after a seeded shuffle for benches drawn at random."""
    b = BENCHES[bench]
    if split not in b.splits:
        raise ValueError(f"{flag}: bench {bench} has no {split} split (it has {', '.join(b.splits)})")
    if b.source == "synthetic" and data is None:
        return synthetic_examples(bench, split, limit or {"train": 5000, "test": 500}[split], seed)
    source = f"{flag} {data}" if data else f"{b.source} ({b.splits[split]} split)"
    kind, text = READERS.get(os.path.splitext(data or "")[1]), ""
    if data and (kind is None or not os.path.isfile(data)):
        raise ValueError(f"{source}: " + ("no such file" if kind else "expected a .jsonl, .json, .parquet or .csv"))
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)   # it logs a bad file before raising
    if data:
        text = Path(data).read_text(encoding="utf-8", errors="replace") if kind == "json" else ""   # for line numbers
        try:
            rows = datasets.load_dataset(kind, data_files=data, split="train").to_list()
        except Exception as e:   # datasets wraps the reader's error, and names no line of a JSON file
            array = text.lstrip().startswith("[")
            for number, line in ([(0, text)] if array else enumerate(text.split("\n"), 1)) if kind == "json" else ():
                try:
                    json.loads(line) if line.strip() else None
                except json.JSONDecodeError as bad:
                    raise ValueError(f"{source}: line {number or bad.lineno} is not JSON: {bad.msg}") from None
            raise ValueError(f"{source}: not a readable {kind} file ({_why(e.__cause__ or e)})") from None
    else:
        check_hub_model(b.source, flag, f"{bench}'s {split} split ({b.source})")
        try:
            parts = [datasets.load_dataset(b.source, c, split=b.splits[split]) for c in b.configs]
        except Exception as e:   # ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            raise ValueError(f"{source}: could not load it ({_why(e)}); pass {flag} PATH, a local file of it") from None
        keep = limit if limit and not b.shuffle else None   # the first `limit` of each config, when only those stay
        rows = [r for ds in parts for r in ds.select(range(min(keep or len(ds), len(ds)))).to_list()]
    lines = [f"line {i + 1}" for i, line in enumerate(text.split("\n")) if line.strip()]   # JSON lines: a row each
    jsonl = kind == "json" and not text.lstrip().startswith("[") and len(lines) == len(rows)
    pairs = list(zip(lines if jsonl else [f"row {i + 1}" for i in range(len(rows))], rows))   # (where, row)
    if bench == "mmlu-medical":   # a whole-MMLU file: its other 51 subjects must not score as medicine
        if missing := next((at for at, row in pairs if not row.get("subject")), None):
            raise ValueError(f"{source}: {missing}: no subject, so the rows cannot be kept to the medical subjects")
        pairs = [(at, row) for at, row in pairs if row["subject"] in MEDICAL]
    if bench == "medmcqa" and data:   # the hub's coding is known: 0-3
        pairs = _medmcqa_zero_based(pairs, source)
    for at, row in pairs:   # the row check: the bench's question and gold answer fields
        try:
            b.ask(row), b.gold(row)
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}: {at}: {e}") from None
    if not pairs:
        raise ValueError(f"{source}: no rows" + (" of the medical subjects" if bench == "mmlu-medical" else ""))
    rows = [row for _, row in pairs]
    if b.shuffle:
        random.Random(seed).shuffle(rows)
    return rows[:limit] if limit else rows


def _medmcqa_zero_based(pairs: list[tuple[str, dict]], source: str) -> list[tuple[str, dict]]:
    """cop as the hub codes it, 0-3; the original release's 1-4 is read (with a note) when a 4 shows it. All in 1..3
    fits both, and a wrong guess would move every gold a letter unseen: refused (a letter a-d settles it)."""
    cops = [c if type(c) is int else None for c in (row.get("cop") for _, row in pairs)]
    ints = set(cops) - {None}
    if {0, 4} <= ints:
        raise ValueError(f"{source}: {pairs[cops.index(4)][0]}: cop 4 in a file that also has cop 0; neither "
                         "MedMCQA's 0-3 coding (the hub's) nor its 1-4 coding (the original release's) allows both")
    if ints and ints <= {1, 2, 3}:
        raise ValueError(f"{source}: every cop lies in 1..3, which fits both MedMCQA's 0-3 coding (the hub's) and its "
                         "1-4 coding (the original release's); write cop as a letter a-d, or load more rows")
    if 4 not in ints or not ints <= {1, 2, 3, 4}:
        return pairs   # 0-3, letters, or a value out of both ranges (which the row check names)
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {source}: cop runs 1..4, the original MedMCQA release's coding; read as 1 = A .. 4 = D",
              file=sys.stderr)
    return [(at, dict(row, cop=c - 1) if c is not None else row) for (at, row), c in zip(pairs, cops)]


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def check_hub_model(name: str, flag: str = "--model", what: str | None = None) -> None:
    """A hub id fails now, in a second, if the hub is out of reach (not after the libraries' minute of retries);
    unchecked offline (HF_HUB_OFFLINE=1: the hub's cache is read) and behind a proxy."""
    unchecked = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "").upper() in
                 ("1", "ON", "YES", "TRUE")] + [v for v in ("HTTPS_PROXY", "https_proxy") if os.environ.get(v)]
    if name == "tiny" or os.path.exists(name) or unchecked:
        return
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:
        socket.create_connection((host.partition(":")[0], int(host.partition(":")[2] or 443)), timeout=3).close()
    except OSError:
        raise ValueError(f"{what or flag + ' ' + name}: the Hugging Face hub is unreachable; pass {flag} PATH to a "
                         "local copy, or "
                         "set HF_HUB_OFFLINE=1 to use a copy in the hub's cache") from None


@dataclasses.dataclass
class Args:
    bench: str = "medqa"  # benchmark, or several comma-separated (evaluate.BENCHES: math, medqa, aime24, ...)
    suite: str | None = None  # a named list in place of --bench (listed above): math, TreeAdv's ten
    model: str = "Qwen/Qwen3-1.7B"  # hub id, local directory (a train.py checkpoint too), or `tiny` (random, offline)
    compare: str | None = None  # a second model beside --model (its files in OUT/compare; both in table and plot)
    data: str | None = None  # local .json/.jsonl/.parquet/.csv file of the bench's test split, in its own schema
    data_dir: str | None = None  # a folder of such files named after the benchmarks (aime24.jsonl, ...), not the hub
    limit: int | None = None  # evaluate the first N examples only (MATH: N drawn at random with --seed, as the paper)
    n: int = 1  # samples per example: avg@n, pass@k, maj@n (--temperature > 0; under torchrun: `--` before evaluate.py)
    temperature: float = 0.0  # 0 = greedy (the papers' validation setting)
    max_new_tokens: int = 2048  # response budget in tokens (the papers': 2,048)
    batch_size: int = 32  # prompts per generation batch (each with n samples); the samples do not depend on it
    thinking: bool = False  # Qwen3 thinking mode (off: 2,048 tokens truncate most thinking; MedQA has its own <think>)
    out: str = "runs/eval"  # output directory: BENCH.json (summary), BENCH.jsonl (a row per example), suite.md/json/png
    device: str = "auto"  # cuda, cuda:N or cpu (auto: this rank's GPU if there is one); bf16 on a GPU, fp32 on the CPU
    seed: int = 0  # seed of the sampler and of random draws
    progress: bool = True  # show a progress bar


def main(argv: list[str] | None = None) -> dict:
    """Run the command; returns {model: {bench: summary}} (on every rank)."""
    args = parse_args(argv)
    files = {b: args.data for b in args.bench.split(",")}
    for b in files if args.data_dir else ():   # --data-dir: the file named after the benchmark
        if not (named := [p for e in READERS if os.path.isfile(p := os.path.join(args.data_dir, b + e))]):
            raise ValueError(f"--data-dir {args.data_dir}: no {b}.jsonl (or .json, .parquet, .csv) in it")
        files[b] = named[0]
    examples = {b: load_examples(b, "test", path, args.limit, args.seed, "--data-dir" if args.data_dir else "--data")
                for b, path in files.items()}
    outs = {args.model: args.out, **({args.compare: os.path.join(args.out, "compare")} if args.compare else {})}
    try:   # an unwritable --out fails now, not after the evaluation (every rank checks, so all stop together)
        for out in outs.values():
            os.makedirs(out, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise ValueError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    import torch.distributed as dist
    import rollout
    from tqdm.auto import tqdm

    device, results = rollout.setup_device(args.device), {}   # under torchrun: the process group too
    rank0, suite = not dist.is_initialized() or dist.get_rank() == 0, len(outs) * len(examples) > 1
    bar = tqdm(total=len(outs) * sum(map(len, examples.values())), desc="suite", dynamic_ncols=True,
               disable=not (args.progress and rank0 and suite))   # across the suite
    for name, out in outs.items():
        model, tokenizer = rollout.load_model_and_tokenizer(name, device=device, seed=args.seed,
                                                            dtype=rollout.compute_dtype(device))
        for bench, rows_in in examples.items():
            summary, rows = evaluate(model, tokenizer, bench, rows_in, n=args.n, temperature=args.temperature,
                                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                                     thinking=args.thinking, progress=args.progress and bar.disable)
            results.setdefault(name, {})[bench] = summary = dict(summary, model=name, data=files[bench])
            bar.update(len(rows_in))
            if rank0:
                bar.write(json.dumps(summary))   # first: a failed write below loses nothing of the result
                Path(out, bench + ".json").write_text(json.dumps(summary, indent=2))
                Path(out, bench + ".jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        del model, tokenizer   # before --compare's model loads
    if rank0 and suite:
        _write_suite(args.out, results)
    if rank0:
        print(f"wrote {args.out}: " + ("suite.md, suite.json, suite.png, " if suite else "")
              + ", ".join(f"{b}.json, {b}.jsonl" for b in examples), flush=True)
    if dist.is_initialized():
        dist.barrier()   # tear down together: a rank leaving early can abort its peer in gloo
        dist.destroy_process_group()
    return results


def _write_suite(out: str, results: dict) -> None:
    """OUT/suite.md, a row per benchmark and their mean: accuracy (avg@n) and tokens per correct solution of each
    model; OUT/suite.json, every summary; OUT/suite.png, the two measures as bars, the models side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    benches = list(next(iter(results.values())))
    cells = {m: {b: [r[b]["accuracy"], r[b]["tokens_per_correct"]] for b in benches} for m, r in results.items()}
    for c in cells.values():   # the mean over the benchmarks that have the measure (None: nothing correct)
        c["mean"] = [sum(v) / len(v) if (v := [x[i] for x in c.values() if x[i] is not None]) else None for i in (0, 1)]
    lines = ["| benchmark | " + " | ".join(f"{m}: accuracy | {m}: tokens per correct" for m in cells) + " |",
             "| --- " * (1 + 2 * len(cells)) + "|"]
    lines += [f"| {b} | " + " | ".join(f"{a:.3f} | " + (f"{t:.0f}" if t is not None else "-") for a, t in
                                       (c[b] for c in cells.values())) + " |" for b in benches + ["mean"]]
    Path(out, "suite.md").write_text("\n".join(lines) + "\n")
    Path(out, "suite.json").write_text(json.dumps(results, indent=2))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(benches)), 4))
    width, x = 1 / (len(cells) + 1), range(len(benches))   # a bar per model, side by side, a gap between benchmarks
    for i, (ax, label) in enumerate(zip(axes, ("accuracy (avg@n)", "tokens per correct solution"))):
        for j, (m, c) in enumerate(cells.items()):
            ax.bar([k + j * width for k in x], [c[b][i] or 0 for b in benches], width, label=m)
        ax.set_xticks([k + (len(cells) - 1) * width / 2 for k in x], benches, rotation=45, ha="right")
        ax.set_title(label)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "suite.png"), dpi=120)
    plt.close(fig)


def dataclass_parser(cls, description: str) -> argparse.ArgumentParser:
    """A typed --flag per field of `cls`; help: the comment after it or the docstring under it, group: the `# --- title`
    above it. Flags not given stay out of the namespace, so `cls(**{**preset, **given})` layers presets under flags."""
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    body = ast.parse("\n".join(lines)).body[0].body
    helps, titles = {}, {}
    for a, b in zip(body, body[1:] + [None]):
        if isinstance(a, ast.AnnAssign):
            comment = re.match(r"\s*#\s*(.*)", lines[a.end_lineno - 1][a.end_col_offset:])
            doc = isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and b.value.value
            helps[a.target.id] = doc.strip() if doc else comment[1] if comment else ""
            titles[a.target.id] = ([m[1] for ln in lines[:a.lineno] if (m := re.match(r"\s*# --- (.+)", ln))]
                                   or ["options"])[-1]
    parser = argparse.ArgumentParser(description=description, usage="%(prog)s [options]",
                                     argument_default=argparse.SUPPRESS, allow_abbrev=False)

    def error(message: str):   # one line; a mistyped flag names the flag it is closest to
        typo = re.match(r"unrecognized arguments: (-[^\s=]+)", message)
        flags = [o for a in parser._actions for o in a.option_strings]
        close = difflib.get_close_matches(typo[1], flags, n=1, cutoff=0.6) if typo else []
        hint = f" (did you mean {close[0]}?)" if close else "" if typo is None else " (--help lists the flags)"
        parser.exit(2, f"{parser.prog}: error: {message}{hint}\n")

    parser.error, hints, groups = error, typing.get_type_hints(cls), {"options": parser}   # untitled: argparse's own
    for f in dataclasses.fields(cls):
        flag, kind, title = "--" + f.name.replace("_", "-"), hints[f.name], titles[f.name]
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if type(None) in typing.get_args(kind):   # X | None -> X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        listed, doc = typing.get_origin(kind) is list, helps[f.name]
        doc += "" if "default" in doc else f" (default: {default})"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=doc)
        else:
            group.add_argument(flag, type=typing.get_args(kind)[0] if listed else kind, nargs="+" if listed else None,
                               help=doc)
    return parser


def parse_args(argv: list[str] | None = None) -> Args:
    """Parse and check every flag (a ValueError naming it) before anything loads."""
    suites = "; ".join(f"--suite {k}: {', '.join(v)}" for k, v in SUITES.items())
    args = Args(**vars(dataclass_parser(Args, f"{__doc__.splitlines()[0]} {suites}.").parse_args(argv)))
    if args.suite is not None and args.suite not in SUITES:
        raise ValueError(f"--suite {args.suite!r}: unknown; choose from {', '.join(SUITES)}")
    args.bench = ",".join(SUITES[args.suite]) if args.suite else args.bench
    if unknown := [b for b in args.bench.split(",") if b not in BENCHES]:
        raise ValueError(f"--bench {unknown[0]!r}: unknown; choose from {', '.join(BENCHES)}")
    if args.data is not None and ("," in args.bench or args.data_dir):
        raise ValueError("--data: one file serves one bench; give a single --bench, or --data-dir for several")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise ValueError(f"--data-dir {args.data_dir}: no such folder")
    for flag in ("limit", "n", "batch_size", "max_new_tokens"):
        if (value := getattr(args, flag)) is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature {args.temperature}: must be a finite number >= 0")
    if args.temperature == 0 and args.n > 1:
        raise ValueError(f"--n {args.n}: greedy decoding gives identical samples; set --temperature > 0")
    if not re.fullmatch(r"auto|cpu|cuda(?::\d+)?", args.device):
        raise ValueError(f"--device {args.device}: expected auto, cpu, cuda or cuda:N")
    for flag, name in (("--model", args.model), ("--compare", args.compare)):
        if name:
            check_hub_model(name, flag)
    return args


# The math-verify child. Cheap checks keep obviously hostile answers from sympy (an exponent tower blocks in C code
# that no timeout interrupts); each check runs in a child bounded by wall clock, so scoring works in any thread or
# process (math-verify's own timeouts use SIGALRM, which only the main thread receives).

MAX_ANSWER_CHARS = 400    # MATH answers are a few dozen characters; a 20k-term sum is not an answer
MAX_NESTING = 30          # bracket depth: sympy's parser recurses on it
VERIFY_TIMEOUT_S = 5.0    # wall clock per math-verify call (its own default timeout is 5 s too)
VERIFY_START_S = 120.0    # the child's imports (sympy) on a busy machine


def hostile_reason(ans: str) -> str | None:
    """Why an extracted answer must not reach sympy, or None if it may."""
    peak = max(itertools.accumulate(((c in "([{") - (c in ")]}") for c in ans[:MAX_ANSWER_CHARS + 1]), initial=0))
    checks = [("length", len(ans) > MAX_ANSWER_CHARS), ("nesting", peak > MAX_NESTING),
              ("dunder", "__" in ans),   # Python attribute access: no LaTeX has it, and sympy's parse_expr evaluates
              ("exponent tower", re.search(r"(?:\^|\*\*)\{?\s*\d+\s*(?:\^|\*\*)", ans)),   # 2^{2^{100}}; not e^{x^2}
              ("huge exponent", re.search(r"(?:\^|\*\*)\{?\s*\d{7}", ans)),   # 2^{9999999999}: a 1.2 GB integer
              ("huge factorial", re.search(r"\d{5,}\s*!", ans))]
    return next((why for why, bad in checks if bad), None)


def _verify_worker() -> None:
    """The child: a request {"gold", "pred"} a line on stdin, a reply {"ok"} on stdout (one first, when ready), with
    math-verify's SIGALRM timeouts off (the parent bounds the time) and its prints and logs sent nowhere."""
    import resource
    from math_verify import parse, verify
    out = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    limit = resource.getrlimit(resource.RLIMIT_AS)[1]   # a blow-up: a MemoryError, not a swapping machine
    resource.setrlimit(resource.RLIMIT_AS, (min(4 << 30, limit) if limit > 0 else 4 << 30, limit))
    print('{"ok": true}', file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            ok = verify(parse(req["gold"], parsing_timeout=None), parse(req["pred"], parsing_timeout=None),
                        timeout_seconds=None, allow_set_relation_comp=True)   # [0, 1/2] equals 0 <= x <= 1/2
        except BaseException:   # MemoryError, RecursionError, whatever sympy raises: not equivalent
            ok = False
        print(json.dumps({"ok": bool(ok)}), file=out, flush=True)


class _Verifier:
    """This process's math-verify child, shared by its threads (a lock serialises requests); a forked process
    starts its own. The child runs this file by path, so Hugging Face's `evaluate` package cannot stand in for it."""

    def __init__(self):
        self.lock, self.proc = threading.Lock(), None
        os.register_at_fork(after_in_child=lambda: self.__dict__.update(lock=threading.Lock(), proc=None))
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def verify(self, gold: str, pred: str, timeout: float) -> bool | None:
        """math-verify's verdict, or None past `timeout` seconds (the child is killed; the next call starts one)."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--verify-worker"], text=True,
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                if self._reply(None, VERIFY_START_S) is None:
                    raise RuntimeError("the math-verify worker process did not start (is math-verify installed?)")
            return self._reply({"gold": gold, "pred": pred}, timeout)

    def _reply(self, request: dict | None, timeout: float) -> bool | None:
        """The child's answer to `request` (None: its greeting); None past `timeout` or if it died (it is killed)."""
        try:
            if request is not None:
                print(json.dumps(request), file=self.proc.stdin, flush=True)
            if select.select([self.proc.stdout], [], [], timeout)[0] and (line := self.proc.stdout.readline()):
                return json.loads(line)["ok"]
        except (OSError, ValueError):
            pass
        self.close()
        return None


_VERIFIER = _Verifier()


if __name__ == "__main__" and sys.argv[1:] == ["--verify-worker"]:   # the math-verify child (not a user flag)
    _verify_worker()
elif __name__ == "__main__":
    try:
        main()
    except ValueError as e:   # a user error: one line naming the flag, argparse's exit code
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
