"""List-rule tasks: the tiny profile's code and chat data, answerable from the prompt alone.

A task is an ordered rule list over integers ("a score greater than 7 is multiplied by 3;
otherwise an even score gets 4 added; any other score is left out") and an aggregate (the new
list, or its total). It is rendered two ways:

- **code** (HumanEval role): signature + docstring stating the rules; the reference is the body.
- **chat** (MT-Bench role): the rules applied to a concrete list given in the prompt; the
  reference explains each item in turn and ends with the result. Its length grows with the list,
  so responses spread from a few dozen to a few hundred tokens, as the Table 1 contexts need.

Every token of a reference follows from the prompt by the rules (no memorised library code, which
a 5M-parameter target pretrained for minutes cannot recall and instead loops on). ``apply`` is the
ground truth the tests check both renderings against.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Action", "Condition", "ListTask", "make_list_task"]

NOUNS: tuple[tuple[str, str], ...] = (
    ("value", "values"), ("number", "numbers"), ("score", "scores"), ("price", "prices"),
    ("count", "counts"), ("age", "ages"), ("size", "sizes"), ("weight", "weights"),
    ("reading", "readings"), ("point", "points"), ("mark", "marks"), ("level", "levels"),
)
LIST_VERBS = ("adjust", "transform", "update", "rescale", "remap", "process", "convert", "filter")
TOTAL_VERBS = ("total", "sum", "tally", "score")


@dataclass(frozen=True)
class Condition:
    """A test on one item: ``kind`` in gt, lt, ge, le, eq, even, odd, div (by ``n``)."""

    kind: str
    n: int = 0

    def test(self, x: int) -> bool:
        k, n = self.kind, self.n
        return {"gt": x > n, "lt": x < n, "ge": x >= n, "le": x <= n, "eq": x == n,
                "even": x % 2 == 0, "odd": x % 2 == 1, "div": n > 0 and x % n == 0}[k]

    def code(self, var: str) -> str:
        n = self.n
        return {"gt": f"{var} > {n}", "lt": f"{var} < {n}", "ge": f"{var} >= {n}", "le": f"{var} <= {n}",
                "eq": f"{var} == {n}", "even": f"{var} % 2 == 0", "odd": f"{var} % 2 == 1",
                "div": f"{var} % {n} == 0"}[self.kind]

    def phrase(self) -> str:
        """What the item is, after "is": "greater than 7", "even", "divisible by 3"."""
        n = self.n
        return {"gt": f"greater than {n}", "lt": f"less than {n}", "ge": f"at least {n}",
                "le": f"at most {n}", "eq": f"equal to {n}", "even": "even", "odd": "odd",
                "div": f"divisible by {n}"}[self.kind]

    def adjective(self, noun: str) -> str:
        """The item as a noun phrase: "a score greater than 7", "an even score"."""
        if self.kind in ("even", "odd"):
            return f"an {self.kind} {noun}"
        article = "an" if noun[0] in "aeiou" else "a"
        return f"{article} {noun} {self.phrase()}"


@dataclass(frozen=True)
class Action:
    """What a matching item becomes: ``kind`` in mul, add, sub, keep, drop (by ``k``)."""

    kind: str
    k: int = 0

    def apply(self, x: int) -> int | None:
        return {"mul": x * self.k, "add": x + self.k, "sub": x - self.k, "keep": x, "drop": None}[self.kind]

    def expr(self, var: str) -> str:
        return {"mul": f"{var} * {self.k}", "add": f"{var} + {self.k}", "sub": f"{var} - {self.k}",
                "keep": var}[self.kind]

    def passive(self) -> str:
        """For the docstring, after the item: "is multiplied by 3", "is left out"."""
        return {"mul": f"is multiplied by {self.k}", "add": f"gets {self.k} added",
                "sub": f"has {self.k} subtracted", "keep": "is kept as it is", "drop": "is left out"}[self.kind]

    def imperative(self) -> str:
        """For the chat prompt: "multiply it by 3", "leave it out"."""
        return {"mul": f"multiply it by {self.k}", "add": f"add {self.k} to it",
                "sub": f"subtract {self.k} from it", "keep": "keep it as it is", "drop": "leave it out"}[self.kind]

    def worked(self, x: int) -> str:
        """The step for item ``x``: "it is multiplied by 3: 8 * 3 = 24"."""
        y = self.apply(x)
        return {"mul": f"it is multiplied by {self.k}: {x} * {self.k} = {y}",
                "add": f"{self.k} is added: {x} + {self.k} = {y}",
                "sub": f"{self.k} is subtracted: {x} - {self.k} = {y}",
                "keep": f"it is kept as {x}", "drop": "it is left out"}[self.kind]


@dataclass(frozen=True)
class ListTask:
    """Ordered rules (first match wins), a fallback for items no rule matches, an aggregate
    (``"list"`` or ``"total"``) and the concrete ``items`` the chat rendering walks through."""

    name: str
    noun: str
    plural: str
    rules: tuple[tuple[Condition, Action], ...]
    otherwise: Action
    aggregate: str
    items: tuple[int, ...]

    def step(self, x: int) -> tuple[int, Action]:
        """(index of the rule that fires, or len(rules) for the fallback; its action)."""
        for i, (cond, act) in enumerate(self.rules):
            if cond.test(x):
                return i, act
        return len(self.rules), self.otherwise

    def apply(self, xs: tuple[int, ...] | list[int]) -> list[int] | int:
        out = [y for y in (self.step(x)[1].apply(x) for x in xs) if y is not None]
        return sum(out) if self.aggregate == "total" else out

    # -- code (HumanEval role) ---------------------------------------------------------------

    def code_prompt(self) -> str:
        what = "the total of the new values" if self.aggregate == "total" else "the new list"
        lines = [f"Go through `{self.plural}` in order and work out a new value for each {self.noun}:", ""]
        for i, (cond, act) in enumerate(self.rules):
            lead = "" if i == 0 else "otherwise, "
            lines.append(f"- {lead}{cond.adjective(self.noun)} {act.passive()};")
        lines.append(f"- any other {self.noun} {self.otherwise.passive()}.")
        lines += ["", f"Return {what}."]
        doc = "\n".join(f"    {ln}" if ln else "" for ln in lines)
        return (f"Complete the body of the function `{self.name}`.\n\n"
                f"def {self.name}({self.plural}):\n    \"\"\"{doc.lstrip()}\n    \"\"\"\n")

    def code_reference(self) -> str:
        v, total = self.noun, self.aggregate == "total"
        acc = "total" if total else "result"

        def emit(act: Action) -> str:
            return f"{acc} += {act.expr(v)}" if total else f"{acc}.append({act.expr(v)})"

        body = [f"{acc} = {'0' if total else '[]'}", f"for {v} in {self.plural}:"]
        for i, (cond, act) in enumerate(self.rules):
            body.append(f"    {'if' if i == 0 else 'elif'} {cond.code(v)}:")
            body.append(f"        {emit(act)}")
        if self.otherwise.kind != "drop":
            body += ["    else:", f"        {emit(self.otherwise)}"]
        body.append(f"return {acc}")
        return "\n".join(f"    {ln}" for ln in body) + "\n"

    # -- chat (MT-Bench role) ----------------------------------------------------------------

    def chat_prompt(self) -> str:
        n = len(self.items)
        head = (f"Take the {self.noun} {self.items[0]}." if n == 1 else
                f"Take the {self.plural} {', '.join(map(str, self.items))}.")
        parts = []
        for i, (cond, act) in enumerate(self.rules):
            lead = "If" if i == 0 else "Otherwise, if"
            parts.append(f"{lead} a {self.noun} is {cond.phrase()}, {act.imperative()}.")
        parts.append(f"Otherwise, {self.otherwise.imperative()}.")
        ask = "give the total" if self.aggregate == "total" else "give the new list"
        return f"{head} {' '.join(parts)} Explain each step, then {ask}."

    def chat_reference(self, walkthrough: str = "item") -> str:
        """The worked answer. ``walkthrough``: ``item`` -- each step names its item ("- 13 is odd,
        ..."); ``pair`` -- each step after the first names the previous item and its own as the
        prompt lists them ("- After 8, 13: 13 is odd, ...").

        No counting either way: a reader (or an induction head) finds the previous item in the
        prompt's list and reads off the next one; the items are distinct, so the lookup is exact.
        ``pair`` writes that lookup out as a copy of two adjacent prompt items; it raised a tiny
        target's copy accuracy, not yet its repetition (README, "Does the tiny target write text?").
        """
        if walkthrough not in WALKTHROUGHS:
            raise ValueError(f"walkthrough={walkthrough!r}; use one of {WALKTHROUGHS}")
        lines = [f"Let's go through the {self.noun if len(self.items) == 1 else self.plural} in order.", ""]
        for j, x in enumerate(self.items):
            fired, act = self.step(x)
            failed = [c.phrase() for c, _ in self.rules[:fired]]
            if fired < len(self.rules):
                why = self.rules[fired][0].phrase()
                said = f"{x} is {why}" if not failed else f"{x} is not {' and not '.join(failed)}, but it is {why}"
            else:
                said = f"{x} is not {' and not '.join(failed)}"
            lead = f"After {self.items[j - 1]}, {x}: " if walkthrough == "pair" and j else ""
            lines.append(f"- {lead}{said}, so {act.worked(x)}.")
        kept = [y for y in (self.step(x)[1].apply(x) for x in self.items) if y is not None]
        lines.append("")
        if self.aggregate == "total":
            if not kept:
                lines.append("No value is left to add, so the total is 0.")
            elif len(kept) == 1:
                lines.append(f"Only {kept[0]} is left, so the total is {kept[0]}.")
            else:
                lines.append(f"Adding up the new values: {' + '.join(map(str, kept))} = {sum(kept)}. The total is {sum(kept)}.")
        else:
            lines.append(f"The new list is {kept}." if kept else "Nothing is left, so the new list is empty: [].")
        return "\n".join(lines)


WALKTHROUGHS = ("item", "pair")
_COND_KINDS = ("gt", "lt", "ge", "le", "eq", "even", "odd", "div")
_ACT_KINDS = ("mul", "add", "sub", "keep")


def _condition(rng: random.Random, used: set[str]) -> Condition:
    kind = rng.choice([k for k in _COND_KINDS if k not in used])
    used.add(kind)
    if kind in ("even", "odd"):
        used.update(("even", "odd"))  # "otherwise, an odd value" after "an even value" is always true
        return Condition(kind)
    return Condition(kind, rng.randint(3, 5) if kind == "div" else rng.randint(2, 20))


def _action(rng: random.Random) -> Action:
    kind = rng.choice(_ACT_KINDS)
    return Action(kind, {"mul": rng.randint(2, 5), "add": rng.randint(1, 9), "sub": rng.randint(1, 9)}.get(kind, 0))


def make_list_task(rng: random.Random, *, max_rules: int = 3, max_items: int = 20) -> ListTask:
    """Draw one task: 1..``max_rules`` rules, a fallback, an aggregate and 1..``max_items``
    distinct items in 0..40 (list lengths uniform, so chat responses spread over their range)."""
    noun, plural = rng.choice(NOUNS)
    used: set[str] = set()
    rules = tuple((_condition(rng, used), _action(rng)) for _ in range(rng.randint(1, max_rules)))
    otherwise = Action("drop") if rng.random() < 0.5 else _action(rng)
    aggregate = "total" if rng.random() < 0.3 else "list"
    verb = rng.choice(TOTAL_VERBS if aggregate == "total" else LIST_VERBS)
    items = tuple(rng.sample(range(41), rng.randint(1, max_items)))
    return ListTask(f"{verb}_{plural}", noun, plural, rules, otherwise, aggregate, items)
