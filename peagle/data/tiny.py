"""Offline, deterministic prompt data for the tiny profile.

Three kinds of examples, each a prompt (``turns[0]``) plus a worked ``reference`` response (the
tiny target is pretrained on prompt + reference, then regenerates responses itself):

- ``code`` (mirrors HumanEval): a list-rule task (``peagle.data.listrules``) as a function to
  complete; prompt = instruction + signature + a docstring stating the rules, reference = the body.
- ``chat`` (mirrors MT-Bench): a list-rule task applied to a list given in the prompt; the
  reference explains every item in turn and ends with the result. Its length grows with the list.
- ``math`` (mirrors GSM8K): procedurally generated word problems with a GSM8K-style worked
  solution (``<<expr=value>>`` calculator annotations) ending in ``#### <answer>``.

Every reference follows from its prompt, so a target pretrained for minutes can learn to answer
held-out prompts rather than loop on half-remembered text. Train/eval disjointness: each kind's
eval and train examples come from separate random streams, and train skips any prompt that is in
eval. The same seed gives byte-identical files on any Python 3 build (only ``random.Random`` with
string seeds, which CPython hashes with SHA-512).
"""

from __future__ import annotations

import math
import os
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peagle.data.io import write_data_dir
from peagle.data.listrules import WALKTHROUGHS, ListTask, make_list_task
from peagle.data.schema import PromptRecord

__all__ = [
    "KINDS",
    "TinyDataError",
    "KIND_ROLE",
    "MATH_TEMPLATES",
    "MathProblem",
    "make_math_problem",
    "make_tiny_data",
]

KINDS: tuple[str, ...] = ("code", "chat", "math")
KIND_ROLE: dict[str, str] = {"code": "humaneval", "chat": "mt_bench", "math": "gsm8k"}
KIND_SOURCE: dict[str, str] = {"code": "tiny/list-code", "chat": "tiny/list-chat", "math": "tiny/arith"}


class TinyDataError(ValueError):
    """The tiny data cannot be generated with the requested parameters."""


@dataclass(frozen=True)
class _Example:
    kind: str
    prompt: str
    reference: str


# ----------------------------------------------------------------------------------------------
# List-rule tasks (code and chat)
# ----------------------------------------------------------------------------------------------


def _list_examples(kind: str, rng: random.Random, n: int, exclude: set[str], *, max_rules: int,
                   max_items: int, walkthrough: str) -> list[_Example]:
    render: Callable[[ListTask], tuple[str, str]] = (
        (lambda t: (t.code_prompt(), t.code_reference())) if kind == "code"
        else (lambda t: (t.chat_prompt(), t.chat_reference(walkthrough))))
    return _distinct(kind, n, exclude, lambda: render(make_list_task(rng, max_rules=max_rules, max_items=max_items)))


def _distinct(kind: str, n: int, exclude: set[str], draw: Callable[[], tuple[str, str]]) -> list[_Example]:
    """``n`` examples with prompts distinct from each other and from ``exclude``."""
    out: list[_Example] = []
    seen = set(exclude)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise TinyDataError(f"could not draw {n} distinct {kind} examples; lower n_train / n_eval")
        prompt, reference = draw()
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append(_Example(kind, prompt, reference))
    return out


# ----------------------------------------------------------------------------------------------
# Arithmetic word problems
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MathProblem:
    """A word problem, its GSM8K-style solution (ending ``#### <answer>``) and its parameters."""

    template: str
    question: str
    solution: str
    answer: int
    params: dict[str, Any]


_PEOPLE = [
    ("Alice", "she", "her"), ("Ben", "he", "his"), ("Carla", "she", "her"), ("David", "he", "his"),
    ("Elena", "she", "her"), ("Farid", "he", "his"), ("Grace", "she", "her"), ("Hugo", "he", "his"),
    ("Ines", "she", "her"), ("Jamal", "he", "his"), ("Keiko", "she", "her"), ("Liam", "he", "his"),
    ("Maya", "she", "her"), ("Noah", "he", "his"), ("Olga", "she", "her"), ("Pedro", "he", "his"),
    ("Rosa", "she", "her"), ("Sami", "he", "his"), ("Tara", "she", "her"), ("Victor", "he", "his"),
]
_GOODS = [
    ("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("sandwich", "sandwiches"),
    ("book", "books"), ("toy car", "toy cars"), ("candle", "candles"), ("mug", "mugs"),
    ("plant", "plants"), ("ticket", "tickets"), ("scarf", "scarves"), ("puzzle", "puzzles"),
]
_THINGS = ["stickers", "marbles", "cookies", "stamps", "pencils", "cards", "beads", "shells"]
_GROUPS = ["friends", "classmates", "cousins", "teammates", "neighbors"]
_VEHICLES = ["train", "bus", "truck", "ferry", "car"]
_PRODUCTS = ["boxes", "jars", "shirts", "loaves", "baskets"]


def _person(rng: random.Random, avoid: Sequence[str] = ()) -> tuple[str, str, str]:
    while True:
        p = rng.choice(_PEOPLE)
        if p[0] not in avoid:
            return p


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _m_shopping(rng: random.Random) -> MathProblem:
    name, _, _ = _person(rng)
    (g1, g1s), (g2, g2s) = rng.sample(_GOODS, 2)
    q1, q2 = rng.randint(2, 9), rng.randint(2, 9)
    p1, p2 = rng.randint(2, 25), rng.randint(2, 25)
    c1, c2 = q1 * p1, q2 * p2
    total = c1 + c2
    bill = (total // 10 + 1 + rng.randint(0, 4)) * 10
    change = bill - total
    question = (
        f"{name} buys {q1} {g1s} for ${p1} each and {q2} {g2s} for ${p2} each. "
        f"{name} pays with ${bill}. How much change does {name} get back?"
    )
    steps = [
        f"The {g1s} cost {q1} * ${p1} = $<<{q1}*{p1}={c1}>>{c1}.",
        f"The {g2s} cost {q2} * ${p2} = $<<{q2}*{p2}={c2}>>{c2}.",
        f"Altogether {name} spends ${c1} + ${c2} = $<<{c1}+{c2}={total}>>{total}.",
        f"So the change is ${bill} - ${total} = $<<{bill}-{total}={change}>>{change}.",
    ]
    return MathProblem("shopping", question, "\n".join(steps) + f"\n#### {change}", change,
                       {"q1": q1, "p1": p1, "q2": q2, "p2": p2, "bill": bill})


def _m_work_rate(rng: random.Random) -> MathProblem:
    name, he, his = _person(rng)
    prod = rng.choice(_PRODUCTS)
    r, h, h2, w = rng.randint(3, 15), rng.randint(4, 9), rng.randint(2, 5), rng.randint(2, 6)
    weekday = 5 * h
    weekly_h = weekday + h2
    weekly = weekly_h * r
    total = weekly * w
    question = (
        f"{name} packs {r} {prod} every hour. From Monday to Friday {he} works {h} hours a day, "
        f"and on Saturday {he} works {h2} hours. How many {prod} does {name} pack in {w} weeks?"
    )
    steps = [
        f"From Monday to Friday {name} works 5 * {h} = <<5*{h}={weekday}>>{weekday} hours.",
        f"With Saturday that is {weekday} + {h2} = <<{weekday}+{h2}={weekly_h}>>{weekly_h} hours a week.",
        f"Each week {he} packs {weekly_h} * {r} = <<{weekly_h}*{r}={weekly}>>{weekly} {prod}.",
        f"In {w} weeks {he} packs {weekly} * {w} = <<{weekly}*{w}={total}>>{total} {prod}.",
    ]
    return MathProblem("work_rate", question, "\n".join(steps) + f"\n#### {total}", total,
                       {"r": r, "h": h, "h2": h2, "w": w})


def _m_travel(rng: random.Random) -> MathProblem:
    v = rng.choice(_VEHICLES)
    v1, t1 = rng.randint(4, 18) * 5, rng.randint(2, 6)
    v2, t2 = rng.randint(4, 18) * 5, rng.randint(1, 5)
    d1, d2 = v1 * t1, v2 * t2
    total = d1 + d2
    question = (
        f"A {v} travels at {v1} kilometers per hour for {t1} hours, then at {v2} kilometers per hour "
        f"for {t2} hours. How many kilometers does the {v} travel in total?"
    )
    steps = [
        f"In the first part it covers {v1} * {t1} = <<{v1}*{t1}={d1}>>{d1} kilometers.",
        f"In the second part it covers {v2} * {t2} = <<{v2}*{t2}={d2}>>{d2} kilometers.",
        f"In total it travels {d1} + {d2} = <<{d1}+{d2}={total}>>{total} kilometers.",
    ]
    return MathProblem("travel", question, "\n".join(steps) + f"\n#### {total}", total,
                       {"v1": v1, "t1": t1, "v2": v2, "t2": t2})


def _m_ages(rng: random.Random) -> MathProblem:
    a_name = _person(rng)[0]
    b_name = _person(rng, (a_name,))[0]
    c_name = _person(rng, (a_name, b_name))[0]
    b, k = rng.randint(3, 15), rng.randint(2, 4)
    a = k * b
    d = rng.randint(1, a - 1)
    c = a - d
    y = rng.randint(2, 12)
    now = a + b + c
    total = now + 3 * y
    question = (
        f"{a_name} is {k} times as old as {b_name}. {b_name} is {b} years old. "
        f"{c_name} is {d} years younger than {a_name}. "
        f"What will be the sum of their three ages in {y} years?"
    )
    steps = [
        f"{a_name} is {k} * {b} = <<{k}*{b}={a}>>{a} years old.",
        f"{c_name} is {a} - {d} = <<{a}-{d}={c}>>{c} years old.",
        f"Now their ages add up to {a} + {b} + {c} = <<{a}+{b}+{c}={now}>>{now} years.",
        f"In {y} years each of the three is {y} years older, which adds 3 * {y} = <<3*{y}={3 * y}>>{3 * y} years.",
        f"So the sum will be {now} + {3 * y} = <<{now}+{3 * y}={total}>>{total} years.",
    ]
    return MathProblem("ages", question, "\n".join(steps) + f"\n#### {total}", total,
                       {"k": k, "b": b, "d": d, "y": y})


def _m_sharing(rng: random.Random) -> MathProblem:
    name, he, his = _person(rng)
    friend = _person(rng, (name,))[0]
    thing, group = rng.choice(_THINGS), rng.choice(_GROUPS)
    k, per, g = rng.randint(2, 9), rng.randint(3, 20), rng.randint(1, 30)
    n = k * per + g
    rest = n - g
    question = (
        f"{name} has {n} {thing}. {_cap(he)} gives {g} of them to {friend} and shares the rest equally "
        f"among {k} {group}. How many {thing} does each of the {group} get?"
    )
    steps = [
        f"After giving {g} away, {name} has {n} - {g} = <<{n}-{g}={rest}>>{rest} {thing} left.",
        f"Shared among {k} {group}, each gets {rest} / {k} = <<{rest}/{k}={per}>>{per} {thing}.",
    ]
    return MathProblem("sharing", question, "\n".join(steps) + f"\n#### {per}", per,
                       {"n": n, "g": g, "k": k})


def _m_savings(rng: random.Random) -> MathProblem:
    name, he, his = _person(rng)
    item = rng.choice(["bicycle", "laptop", "guitar", "camera", "tent", "telescope"])
    q, h = rng.randint(2, 5), rng.randint(5, 20)
    wage = q * rng.randint(2, 6)  # a multiple of q, so 1/q of the weekly pay is a whole number
    weeks = rng.randint(3, 12)
    weekly = wage * h
    saved = weekly // q
    cost = saved * weeks
    question = (
        f"{name} earns ${wage} per hour and works {h} hours every week. {_cap(he)} saves 1/{q} of {his} "
        f"pay each week. How many weeks does {name} need to save for a {item} that costs ${cost}?"
    )
    steps = [
        f"Each week {name} earns {wage} * {h} = $<<{wage}*{h}={weekly}>>{weekly}.",
        f"{_cap(he)} saves {weekly} / {q} = $<<{weekly}/{q}={saved}>>{saved} a week.",
        f"To save ${cost} {he} needs {cost} / {saved} = <<{cost}/{saved}={weeks}>>{weeks} weeks.",
    ]
    return MathProblem("savings", question, "\n".join(steps) + f"\n#### {weeks}", weeks,
                       {"wage": wage, "h": h, "q": q, "cost": cost})


def _m_discount(rng: random.Random) -> MathProblem:
    name = _person(rng)[0]
    g, gs = rng.choice(_GOODS)
    d = rng.choice([10, 20, 25, 50])
    step = 100 // math.gcd(d, 100)  # price multiple that makes the discount a whole number
    price = step * rng.randint(max(1, 8 // step), 120 // step)
    n = rng.randint(2, 9)
    off = price * d // 100
    new = price - off
    total = new * n
    question = (
        f"A shop sells {gs} for ${price} each. During a sale every price is {d}% lower. "
        f"{name} buys {n} {gs} during the sale. How much does {name} pay?"
    )
    steps = [
        f"The discount is {price} * {d} / 100 = $<<{price}*{d}/100={off}>>{off} per {g}.",
        f"So one {g} costs {price} - {off} = $<<{price}-{off}={new}>>{new}.",
        f"For {n} {gs} {name} pays {n} * {new} = $<<{n}*{new}={total}>>{total}.",
    ]
    return MathProblem("discount", question, "\n".join(steps) + f"\n#### {total}", total,
                       {"price": price, "d": d, "n": n})


def _m_harvest(rng: random.Random) -> MathProblem:
    name, he, his = _person(rng)
    a, m = rng.randint(10, 60), rng.randint(2, 4)
    tue = a * m
    x = rng.randint(1, tue - 1)
    wed = tue - x
    total = a + tue + wed
    price = rng.randint(1, 5)
    money = total * price
    question = (
        f"{name} picks {a} apples on Monday. On Tuesday {he} picks {m} times as many as on Monday, and on "
        f"Wednesday {x} fewer than on Tuesday. {_cap(he)} sells every apple for ${price}. "
        f"How much money does {name} make?"
    )
    steps = [
        f"On Tuesday {name} picks {a} * {m} = <<{a}*{m}={tue}>>{tue} apples.",
        f"On Wednesday {he} picks {tue} - {x} = <<{tue}-{x}={wed}>>{wed} apples.",
        f"Altogether {he} picks {a} + {tue} + {wed} = <<{a}+{tue}+{wed}={total}>>{total} apples.",
        f"Selling them brings in {total} * ${price} = $<<{total}*{price}={money}>>{money}.",
    ]
    return MathProblem("harvest", question, "\n".join(steps) + f"\n#### {money}", money,
                       {"a": a, "m": m, "x": x, "price": price})


MATH_TEMPLATES: dict[str, Callable[[random.Random], MathProblem]] = {
    "shopping": _m_shopping,
    "work_rate": _m_work_rate,
    "travel": _m_travel,
    "ages": _m_ages,
    "sharing": _m_sharing,
    "savings": _m_savings,
    "discount": _m_discount,
    "harvest": _m_harvest,
}


def make_math_problem(rng: random.Random, template: str | None = None) -> MathProblem:
    """Draw one word problem (a random template unless ``template`` names one)."""
    if template is None:
        template = rng.choice(sorted(MATH_TEMPLATES))
    if template not in MATH_TEMPLATES:
        raise TinyDataError(f"unknown math template {template!r}; known: {', '.join(sorted(MATH_TEMPLATES))}")
    return MATH_TEMPLATES[template](rng)


def _math_examples(rng: random.Random, n: int, exclude: set[str]) -> list[_Example]:
    def draw() -> tuple[str, str]:
        p = make_math_problem(rng)
        return p.question, p.solution

    return _distinct("math", n, exclude, draw)


# ----------------------------------------------------------------------------------------------
# The data directory
# ----------------------------------------------------------------------------------------------


def _counts(n: int, mix: Sequence[float]) -> dict[str, int]:
    weights = dict(zip(KINDS, mix))
    raw = {k: n * w / sum(mix) for k, w in weights.items()}
    q = {k: int(math.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (-(raw[k] - q[k]), KINDS.index(k)))[: n - sum(q.values())]:
        q[k] += 1
    return q


def _length_stats(texts: Sequence[str]) -> dict[str, int]:
    if not texts:
        return {"n": 0, "median": 0, "p90": 0, "max": 0}
    lens = sorted(len(t) for t in texts)
    return {"n": len(lens), "median": int(statistics.median(lens)),
            "p90": lens[min(len(lens) - 1, int(0.9 * len(lens)))], "max": lens[-1]}


def make_tiny_data(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    n_train: int = 3000,
    n_eval: int = 40,
    *,
    mix: Sequence[float] = (0.4, 0.3, 0.3),
    max_rules: int = 3,
    max_items: int = 20,
    walkthrough: str = "item",
) -> dict[str, Any]:
    """Generate the tiny profile's prompt files into ``out_dir``; return the manifest.

    ``mix`` weighs (code, chat, math) in ``train.jsonl``; each eval file holds ``n_eval`` examples
    of one kind. ``max_rules`` / ``max_items`` bound the list-rule tasks (rules per task, items per
    chat list), ``walkthrough`` the form of the chat answers' steps (``ListTask.chat_reference``).
    Raises :class:`TinyDataError` naming the parameter that is out of range.
    """
    if n_train < 1 or n_eval < 1:
        raise TinyDataError(f"n_train and n_eval must be >= 1 (got n_train={n_train}, n_eval={n_eval})")
    if len(mix) != 3 or any(w < 0 for w in mix) or sum(mix) <= 0:
        raise TinyDataError(f"mix must be three non-negative weights for (code, chat, math), got {tuple(mix)}")
    if not 1 <= max_rules <= 6 or not 1 <= max_items <= 40:
        raise TinyDataError(f"need 1 <= max_rules <= 6 and 1 <= max_items <= 40, got {max_rules}, {max_items}")

    def rng(stream: str) -> random.Random:
        # String seeds go through SHA-512 in CPython: stable across runs and PYTHONHASHSEED.
        return random.Random(f"peagle-tiny:{seed}:{stream}")

    want = _counts(n_train, mix)
    if walkthrough not in WALKTHROUGHS:
        raise TinyDataError(f"walkthrough={walkthrough!r}; use one of {WALKTHROUGHS}")
    size = {"max_rules": max_rules, "max_items": max_items, "walkthrough": walkthrough}
    selected: dict[str, dict[str, list[_Example]]] = {"train": {}, "eval": {}}
    for kind in ("code", "chat"):
        selected["eval"][kind] = _list_examples(kind, rng(f"{kind}:eval"), n_eval, set(), **size)
        held_out = {e.prompt for e in selected["eval"][kind]}
        selected["train"][kind] = _list_examples(kind, rng(f"{kind}:train"), want[kind], held_out, **size)
    selected["eval"]["math"] = _math_examples(rng("math:eval"), n_eval, set())
    eval_math_q = {e.prompt for e in selected["eval"]["math"]}
    selected["train"]["math"] = _math_examples(rng("math:train"), want["math"], eval_math_q)

    def records(split: str, kind: str, prefix: str, role: str) -> list[PromptRecord]:
        return [
            PromptRecord(id=f"{prefix}-{i:05d}", source=KIND_SOURCE[kind], role=role, turns=(e.prompt,), reference=e.reference)
            for i, e in enumerate(selected[split][kind])
        ]

    train: list[PromptRecord] = []
    for kind in KINDS:
        train += records("train", kind, f"tiny-train-{kind}", "train")
    rng("train-order").shuffle(train)  # interleave kinds: later stages may use only a prefix
    evals = {KIND_ROLE[k]: records("eval", k, f"tiny-{KIND_ROLE[k]}", KIND_ROLE[k]) for k in KINDS}

    params = {"source": "synthetic", "seed": seed, "n_train": n_train, "n_eval": n_eval, "mix": list(mix), **size}
    extra = {
        "generator": "peagle.data.tiny",
        "counts": {
            "train": {k: len(selected["train"][k]) for k in KINDS},
            "eval": {KIND_ROLE[k]: len(selected["eval"][k]) for k in KINDS},
        },
        "reference_chars": {k: _length_stats([e.reference for e in selected["train"][k]]) for k in KINDS},
    }
    # No timings in the manifest: it must be byte-identical for the same seed.
    return write_data_dir(out_dir, train, evals, params=params, extra=extra)
