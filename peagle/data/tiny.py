"""Offline, deterministic prompt data for the tiny profile.

Three kinds of examples, each a prompt (``turns[0]``) plus a worked ``reference`` response (the
tiny target is pretrained on prompt + reference, then regenerates responses itself):

- ``code`` (mirrors HumanEval): a documented function or method from the Python standard library;
  prompt = instruction + signature + docstring, reference = the body (indented as under the
  ``def``), so ``signature + docstring + reference`` is the original function.
- ``chat`` (mirrors MT-Bench): questions about stdlib functions, classes and modules answered from
  their docstrings and signatures (explain / parameters / class overview / module overview).
- ``math`` (mirrors GSM8K): procedurally generated word problems with a GSM8K-style worked
  solution (``<<expr=value>>`` calculator annotations) ending in ``#### <answer>``.

Train/eval disjointness: code and chat are split by module (a fixed hash of the module name puts
about ``eval_module_percent``% of modules in eval, independent of the seed, and a function whose
code also appears in an eval module is dropped from train); math eval and train come from
separate random streams and train skips any question that is in eval. The seed only chooses
which examples are drawn and their order; the same seed and Python build give byte-identical
files. The manifest records the Python version and a hash of the stdlib sources read, because a
different Python gives different code/chat data.
"""

from __future__ import annotations

import ast
import hashlib
import math
import os
import platform
import random
import re
import statistics
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peagle.data.io import write_data_dir
from peagle.data.schema import PromptRecord

__all__ = [
    "KINDS",
    "TinyDataError",
    "KIND_ROLE",
    "MATH_TEMPLATES",
    "MathProblem",
    "make_math_problem",
    "make_tiny_data",
    "scan_stdlib",
    "split_of_module",
]

KINDS: tuple[str, ...] = ("code", "chat", "math")
KIND_ROLE: dict[str, str] = {"code": "humaneval", "chat": "mt_bench", "math": "gsm8k"}
KIND_SOURCE: dict[str, str] = {"code": "tiny/stdlib-code", "chat": "tiny/stdlib-chat", "math": "tiny/arith"}

# Top-level stdlib entries that are not ordinary library code (tests, GUIs, vendored or generated
# data, deprecated duplicates) or are machine-specific (_sysconfigdata_*), which would make the
# data depend on the build rather than the Python version.
_SKIP_TOP = {
    "site-packages", "dist-packages", "lib-dynload", "test", "idlelib", "lib2to3", "tkinter",
    "turtledemo", "ensurepip", "__phello__", "pydoc_data", "encodings", "distutils",
}
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}
_SKIP_FILES = {"this.py", "antigravity.py", "__hello__.py"}


class TinyDataError(ValueError):
    """The tiny data cannot be generated with the requested parameters."""


# ----------------------------------------------------------------------------------------------
# Standard-library scan
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Param:
    name: str
    kind: str  # "posonly" | "normal" | "vararg" | "kwonly" | "kwarg"
    default: str | None
    annotation: str | None


@dataclass(frozen=True)
class FuncInfo:
    """A documented top-level function or method of a top-level class."""

    module: str
    cls: str | None
    name: str
    lineno: int
    doc: str  # cleaned docstring text
    signature: str  # "name(args)"
    params: tuple[_Param, ...]  # without self/cls
    returns: str | None
    # (header, docstring source, body), dedented so the def is at column 0; None if unusable
    code: tuple[str, str, str] | None

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.cls}.{self.name}" if self.cls else f"{self.module}.{self.name}"


@dataclass(frozen=True)
class ClassInfo:
    module: str
    name: str
    bases: tuple[str, ...]
    doc: str
    methods: tuple[tuple[str, str], ...]  # (signature, first sentence) of public documented methods


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    doc: str
    functions: tuple[str, ...]
    classes: tuple[str, ...]


@dataclass
class StdlibScan:
    """Everything extracted from the stdlib, in deterministic (module, line) order."""

    root: str
    files: list[str] = field(default_factory=list)
    sources_sha256: str = ""
    functions: list[FuncInfo] = field(default_factory=list)
    classes: list[ClassInfo] = field(default_factory=list)
    modules: list[ModuleInfo] = field(default_factory=list)


def _stdlib_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        at_top = rel == Path(".")
        dirnames[:] = [
            d for d in dirnames
            if d not in _SKIP_DIRS and not (at_top and (d in _SKIP_TOP or d.startswith("config-")))
        ]
        for f in filenames:
            if f.endswith(".py") and f not in _SKIP_FILES and not f.startswith("_sysconfigdata"):
                found.append(rel / f)
    # Sorted by path string: os.walk order depends on the filesystem.
    return sorted(found, key=lambda p: p.as_posix())


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _dedent_block(lines: list[str], col: int) -> list[str] | None:
    """Strip ``col`` leading spaces from every line; None if a line is less indented or uses tabs."""
    out: list[str] = []
    for ln in lines:
        s = ln.rstrip()
        if not s:
            out.append("")
            continue
        indent = len(s) - len(s.lstrip(" \t"))
        if "\t" in s[:indent] or indent < col:
            return None  # e.g. a multi-line string literal flush left: cutting would corrupt it
        out.append(s[col:])
    return out


def _params_of(node: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> tuple[_Param, ...]:
    a = node.args

    def ann(x: ast.arg) -> str | None:
        return ast.unparse(x.annotation) if x.annotation is not None else None

    positional = [(x, "posonly") for x in a.posonlyargs] + [(x, "normal") for x in a.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params: list[_Param] = []
    for (x, kind), d in zip(positional, defaults):
        params.append(_Param(x.arg, kind, ast.unparse(d) if d is not None else None, ann(x)))
    if a.vararg is not None:
        params.append(_Param(a.vararg.arg, "vararg", None, ann(a.vararg)))
    for x, d in zip(a.kwonlyargs, a.kw_defaults):
        params.append(_Param(x.arg, "kwonly", ast.unparse(d) if d is not None else None, ann(x)))
    if a.kwarg is not None:
        params.append(_Param(a.kwarg.arg, "kwarg", None, ann(a.kwarg)))
    decorators = {ast.unparse(d) for d in node.decorator_list}
    if is_method and "staticmethod" not in decorators and params and params[0].kind in ("posonly", "normal"):
        params = params[1:]  # the receiver (self / cls / mcls): not something a caller passes
    return tuple(params)


def _code_parts(
    node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], max_doc_lines: int
) -> tuple[str, str, str] | None:
    doc_node = node.body[0]
    if len(node.body) < 2 or doc_node.lineno == node.lineno or node.body[1].lineno <= (doc_node.end_lineno or 0):
        return None
    end = node.end_lineno or node.lineno
    block = _dedent_block(lines[node.lineno - 1 : end], node.col_offset)
    if block is None:
        return None
    d0 = doc_node.lineno - node.lineno
    d1 = (doc_node.end_lineno or doc_node.lineno) - node.lineno + 1
    header, doc_src, body = block[:d0], block[d0:d1], block[d1:]
    while body and not body[0]:
        body.pop(0)
    while body and not body[-1]:
        body.pop()
    if not body or len(doc_src) > max_doc_lines:
        return None
    text = "\n".join(header + doc_src + body)
    # ASCII only and no very long lines: keeps the tiny tokenizer's job (and the prompts) sane.
    if not text.isascii() or max(len(x) for x in block) > 100:
        return None
    return "\n".join(header), "\n".join(doc_src), "\n".join(body)


def _first_sentence(doc: str, limit: int = 160) -> str:
    para = " ".join(doc.strip().split("\n\n", 1)[0].split())
    m = re.search(r"(?<=[.!?])\s", para)
    s = para[: m.start()] if m else para
    return s if len(s) <= limit else s[: limit - 3].rstrip() + "..."


def _scan_file(module: str, source: bytes, max_doc_lines: int) -> tuple[list[FuncInfo], list[ClassInfo], ModuleInfo | None]:
    try:
        tree = ast.parse(source)
        text = source.decode("utf-8")
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return [], [], None  # a stdlib file newer syntax cannot parse is skipped, not fatal
    lines = text.splitlines()
    funcs: list[FuncInfo] = []
    classes: list[ClassInfo] = []

    def func_info(node: ast.FunctionDef | ast.AsyncFunctionDef, cls: str | None) -> FuncInfo | None:
        doc = ast.get_docstring(node)
        if not doc or not doc.strip():
            return None
        return FuncInfo(
            module=module, cls=cls, name=node.name, lineno=node.lineno, doc=doc,
            signature=f"{node.name}({ast.unparse(node.args)})",
            params=_params_of(node, cls is not None),
            returns=ast.unparse(node.returns) if node.returns is not None else None,
            code=_code_parts(node, lines, max_doc_lines),
        )

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            fi = func_info(node, None)
            if fi is not None:
                funcs.append(fi)
        elif isinstance(node, ast.ClassDef):
            methods: list[tuple[str, str]] = []
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    fi = func_info(sub, node.name)
                    if fi is None:
                        continue
                    funcs.append(fi)
                    if not sub.name.startswith("_"):
                        sig = f"{sub.name}({', '.join(_param_src(p) for p in fi.params)})"
                        methods.append((sig, _first_sentence(fi.doc)))
            cdoc = ast.get_docstring(node) or ""
            classes.append(ClassInfo(module, node.name, tuple(ast.unparse(b) for b in node.bases), cdoc, tuple(methods)))
    mdoc = ast.get_docstring(tree) or ""
    public_funcs = tuple(f.name for f in funcs if f.cls is None and not f.name.startswith("_"))
    public_classes = tuple(c.name for c in classes if not c.name.startswith("_"))
    return funcs, classes, ModuleInfo(module, mdoc, public_funcs, public_classes)


def _param_src(p: _Param) -> str:
    prefix = {"vararg": "*", "kwarg": "**"}.get(p.kind, "")
    s = prefix + p.name
    if p.default is not None:
        s += f"={p.default}"
    return s


# Parsing the stdlib costs ~2 s; results are cached per (module, content hash, option) so repeated
# calls in one process (tests, the pipeline) pay once, while a changed file is re-parsed.
_FILE_CACHE: dict[tuple[str, str, int], tuple[list[FuncInfo], list[ClassInfo], ModuleInfo | None]] = {}


def scan_stdlib(stdlib_dir: str | os.PathLike[str] | None = None, *, max_doc_lines: int = 25) -> StdlibScan:
    """Parse the standard library's Python sources (sorted) and collect documented definitions."""
    root = Path(stdlib_dir) if stdlib_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise TinyDataError(f"stdlib_dir {root} is not a directory (peagle.data.tiny.scan_stdlib)")
    scan = StdlibScan(root=str(root))
    h = hashlib.sha256()
    for rel in _stdlib_files(root):
        data = (root / rel).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        h.update(f"{rel.as_posix()}\0{digest}\n".encode())
        scan.files.append(rel.as_posix())
        module = _module_name(rel)
        key = (module, digest, max_doc_lines)
        if key not in _FILE_CACHE:
            _FILE_CACHE[key] = _scan_file(module, data, max_doc_lines)
        funcs, classes, mod = _FILE_CACHE[key]
        scan.functions.extend(funcs)
        scan.classes.extend(classes)
        if mod is not None:
            scan.modules.append(mod)
    scan.sources_sha256 = h.hexdigest()
    return scan


def split_of_module(module: str, eval_module_percent: int) -> str:
    """``"eval"`` or ``"train"`` for a module, from a fixed hash of its name (seed-independent)."""
    bucket = int.from_bytes(hashlib.sha256(f"peagle-tiny-split:{module}".encode()).digest()[:4], "big") % 100
    return "eval" if bucket < eval_module_percent else "train"


# ----------------------------------------------------------------------------------------------
# Code and chat examples
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Example:
    kind: str
    prompt: str
    reference: str
    dedup_key: str  # content identity across splits (code: the function text; chat: prompt)


def _code_example(f: FuncInfo, min_body_lines: int, max_body_lines: int) -> _Example | None:
    if f.code is None:
        return None
    header, doc_src, body = f.code
    n_lines = len(body.splitlines())
    n_code = sum(1 for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith("#"))
    if n_code < min_body_lines or n_lines > max_body_lines:
        return None
    if f.cls:
        what = f"the method `{f.name}` of class `{f.cls}` from the `{f.module}` module"
    else:
        what = f"the function `{f.name}` from the `{f.module}` module"
    # The instruction is one line, so the code always follows the first blank line ("\n\n").
    prompt = f"Complete the body of {what}.\n\n{header}\n{doc_src}\n"
    return _Example("code", prompt, body, f"{header}\n{doc_src}\n{body}")


def _paragraphs(doc: str, max_chars: int, max_paras: int) -> str:
    """The docstring's leading prose: reflowed paragraphs, stopping at examples or the budget."""
    out: list[str] = []
    total = 0
    for para in re.split(r"\n\s*\n", doc.strip()):
        lines = [ln.rstrip() for ln in para.splitlines() if ln.strip()]
        if not lines or any(ln.lstrip().startswith(">>>") for ln in lines):
            break  # doctests read badly as prose and are code, not explanation
        structured = any(ln.startswith((" ", "\t")) for ln in lines[1:]) or any(
            ln.lstrip().startswith(("- ", "* ", "+ ")) for ln in lines
        )
        text = "\n".join(lines) if structured else " ".join(ln.strip() for ln in lines)
        if out and total + len(text) > max_chars:
            break
        out.append(text)
        total += len(text)
        if len(out) >= max_paras:
            break
    return "\n\n".join(out)


def _pick(key: str, options: Sequence[str]) -> str:
    # Phrasing is chosen by a hash of the subject, not the seed, so the pool is seed-independent.
    return options[int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % len(options)]


def _describe_param(p: _Param) -> str:
    ann = f", `{p.annotation}`" if p.annotation else ""
    if p.kind == "vararg":
        return f"- `*{p.name}`{ann}: any number of extra positional arguments"
    if p.kind == "kwarg":
        return f"- `**{p.name}`{ann}: any extra keyword arguments"
    where = {"posonly": "positional-only, ", "kwonly": "keyword-only, "}.get(p.kind, "")
    need = "required" if p.default is None else f"optional, default `{p.default}`"
    return f"- `{p.name}` ({where}{need}{ann})"


def _chat_examples(scan: StdlibScan, modules: set[str]) -> dict[str, list[_Example]]:
    """Chat pools by sub-type for the given modules (deterministic order, unique prompts)."""
    pools: dict[str, list[_Example]] = {"explain": [], "params": [], "class": [], "module": []}
    for f in scan.functions:
        if f.module not in modules or f.name.startswith("__") or not f.doc.isascii():
            continue
        q = f.qualname
        paras = _paragraphs(f.doc, 900, 4)
        kind = f"a method of the class `{f.cls}` in" if f.cls else "a function in"
        if len(paras) >= 40:
            prompt = _pick(q, ("Explain what `{q}` does.", "What does `{q}` do?", "Describe the purpose of `{q}`.")).format(q=q)
            ref = f"`{q}` is {kind} the `{f.module}` module. Its signature is `{f.signature}`.\n\n{paras}"
            pools["explain"].append(_Example("chat", prompt, ref, prompt))
        if f.params and len(f.signature) <= 200:
            prompt = _pick(q + "#p", ("What parameters does `{q}` take?", "Which arguments does `{q}` accept?")).format(q=q)
            n = len(f.params)
            lines = [f"`{q}` takes {n} parameter{'s' if n != 1 else ''}{' besides the receiver' if f.cls else ''}:"]
            lines += [_describe_param(p) for p in f.params]
            if f.returns:
                lines.append(f"It is annotated to return `{f.returns}`.")
            lines.append(f"In short: {_first_sentence(f.doc)}")
            pools["params"].append(_Example("chat", prompt, "\n".join(lines), prompt))
    for c in scan.classes:
        if c.module not in modules or c.name.startswith("_") or not (c.doc + "".join(m[1] for m in c.methods)).isascii():
            continue
        paras = _paragraphs(c.doc, 700, 3)
        if len(paras) < 40 and len(c.methods) < 2:
            continue
        q = f"{c.module}.{c.name}"
        prompt = _pick(q, ("What is the `{q}` class for?", "Explain the `{q}` class.")).format(q=q)
        bases = [b for b in c.bases if b != "object"]
        head = f"`{c.name}` is a class in the `{c.module}` module"
        head += f" that derives from {', '.join(f'`{b}`' for b in bases)}." if bases else "."
        parts = [head] + ([paras] if paras else [])
        if c.methods:
            shown = c.methods[:10]
            more = f"\n(and {len(c.methods) - len(shown)} more)" if len(c.methods) > len(shown) else ""
            parts.append("Its public methods are:\n" + "\n".join(f"- `{s}`: {d}" for s, d in shown) + more)
        pools["class"].append(_Example("chat", prompt, "\n\n".join(parts), prompt))
    for m in scan.modules:
        if m.name not in modules or not m.doc.isascii():
            continue
        paras = _paragraphs(m.doc, 900, 4)
        if len(paras) < 40:
            continue
        prompt = _pick(m.name, ("Give an overview of the `{q}` module.", "What is the `{q}` module for?")).format(q=m.name)
        parts = [f"The `{m.name}` module: {paras}"]
        if m.functions:
            parts.append("Public functions: " + ", ".join(f"`{x}`" for x in m.functions[:15]) + (", ..." if len(m.functions) > 15 else "."))
        if m.classes:
            parts.append("Public classes: " + ", ".join(f"`{x}`" for x in m.classes[:15]) + (", ..." if len(m.classes) > 15 else "."))
        pools["module"].append(_Example("chat", prompt, "\n\n".join(parts), prompt))
    for name, pool in pools.items():
        seen: set[str] = set()
        pools[name] = [e for e in pool if not (e.prompt in seen or seen.add(e.prompt))]  # type: ignore[func-returns-value]
    return pools


_CHAT_WEIGHTS = {"explain": 0.4, "params": 0.25, "class": 0.2, "module": 0.15}


def _quota(n: int, weights: dict[str, float], capacity: dict[str, int]) -> dict[str, int]:
    """Split ``n`` by weights (largest remainder), then move overflow to types with room."""
    total = sum(weights.values())
    raw = {k: n * w / total for k, w in weights.items()}
    q = {k: int(math.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (-(raw[k] - q[k]), k))[: n - sum(q.values())]:
        q[k] += 1
    spill = 0
    for k in q:
        if q[k] > capacity[k]:
            spill += q[k] - capacity[k]
            q[k] = capacity[k]
    for k in weights:  # weights' order is the fallback priority
        take = min(spill, capacity[k] - q[k])
        q[k] += take
        spill -= take
    if spill:
        raise TinyDataError(f"need {n} chat examples but only {sum(capacity.values())} are available")
    return q


def _sample(pool: Sequence[_Example], n: int, rng: random.Random, what: str, fix: str) -> list[_Example]:
    if n > len(pool):
        raise TinyDataError(f"{what}: asked for {n} examples but only {len(pool)} are available; {fix}")
    return rng.sample(list(pool), n)


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
    out: list[_Example] = []
    seen = set(exclude)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise TinyDataError(f"could not draw {n} distinct math problems; lower n_train / n_eval")
        p = make_math_problem(rng)
        if p.question in seen:
            continue
        seen.add(p.question)
        out.append(_Example("math", p.question, p.solution, p.question))
    return out


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
    eval_module_percent: int = 20,
    min_body_lines: int = 3,
    max_body_lines: int = 60,
    max_doc_lines: int = 25,
    stdlib_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Generate the tiny profile's prompt files into ``out_dir``; return the manifest.

    ``mix`` weighs (code, chat, math) in ``train.jsonl``; each eval file holds ``n_eval`` examples
    of one kind. Raises :class:`TinyDataError` naming the parameter when a pool is too small.
    """
    if n_train < 1 or n_eval < 1:
        raise TinyDataError(f"n_train and n_eval must be >= 1 (got n_train={n_train}, n_eval={n_eval})")
    if len(mix) != 3 or any(w < 0 for w in mix) or sum(mix) <= 0:
        raise TinyDataError(f"mix must be three non-negative weights for (code, chat, math), got {tuple(mix)}")
    if not 1 <= eval_module_percent <= 50:
        raise TinyDataError(f"eval_module_percent must be in [1, 50], got {eval_module_percent}")
    if not 1 <= min_body_lines <= max_body_lines:
        raise TinyDataError(f"need 1 <= min_body_lines <= max_body_lines, got {min_body_lines}, {max_body_lines}")

    scan = scan_stdlib(stdlib_dir, max_doc_lines=max_doc_lines)
    split_modules: dict[str, set[str]] = {"train": set(), "eval": set()}
    for m in sorted({f.module for f in scan.functions} | {m.name for m in scan.modules}):
        split_modules[split_of_module(m, eval_module_percent)].add(m)

    def rng(stream: str) -> random.Random:
        # String seeds go through SHA-512 in CPython: stable across runs and PYTHONHASHSEED.
        return random.Random(f"peagle-tiny:{seed}:{stream}")

    # --- code: eval first, then train minus anything whose code also lives in eval
    code_pool: dict[str, list[_Example]] = {"train": [], "eval": []}
    seen_code: set[str] = set()
    for f in scan.functions:
        ex = _code_example(f, min_body_lines, max_body_lines)
        if ex is None or ex.dedup_key in seen_code:
            continue
        seen_code.add(ex.dedup_key)
        code_pool[split_of_module(f.module, eval_module_percent)].append(ex)
    eval_bodies = {e.reference for e in code_pool["eval"]}
    code_pool["train"] = [e for e in code_pool["train"] if e.reference not in eval_bodies]

    chat_pools = {s: _chat_examples(scan, mods) for s, mods in split_modules.items()}
    eval_chat_prompts = {e.prompt for pool in chat_pools["eval"].values() for e in pool}
    for k, pool in chat_pools["train"].items():
        chat_pools["train"][k] = [e for e in pool if e.prompt not in eval_chat_prompts]

    want = _counts(n_train, mix)
    fix = "lower n_train/n_eval, change mix, or raise eval_module_percent / max_body_lines"
    selected: dict[str, dict[str, list[_Example]]] = {"train": {}, "eval": {}}
    selected["eval"]["code"] = _sample(code_pool["eval"], n_eval, rng("code:eval"), "code eval (n_eval)", fix)
    selected["train"]["code"] = _sample(code_pool["train"], want["code"], rng("code:train"), "code train (n_train*mix)", fix)
    for split, n in (("eval", n_eval), ("train", want["chat"])):
        pools = chat_pools[split]
        quota = _quota(n, _CHAT_WEIGHTS, {k: len(v) for k, v in pools.items()})
        r = rng(f"chat:{split}")
        picked: list[_Example] = []
        for k in _CHAT_WEIGHTS:
            picked += _sample(pools[k], quota[k], r, f"chat {k} {split}", fix)
        r.shuffle(picked)
        selected[split]["chat"] = picked
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

    params = {
        "source": "synthetic", "seed": seed, "n_train": n_train, "n_eval": n_eval, "mix": list(mix),
        "eval_module_percent": eval_module_percent, "min_body_lines": min_body_lines,
        "max_body_lines": max_body_lines, "max_doc_lines": max_doc_lines,
    }
    extra = {
        "generator": "peagle.data.tiny",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib": {
            "files": len(scan.files),
            "sources_sha256": scan.sources_sha256,
            "modules_train": len(split_modules["train"]),
            "modules_eval": len(split_modules["eval"]),
            "eval_modules": sorted(split_modules["eval"]),
        },
        "counts": {
            "train": {k: len(selected["train"][k]) for k in KINDS},
            "eval": {KIND_ROLE[k]: len(selected["eval"][k]) for k in KINDS},
            "pool": {
                "code": {s: len(code_pool[s]) for s in ("train", "eval")},
                "chat": {s: {k: len(v) for k, v in chat_pools[s].items()} for s in ("train", "eval")},
            },
        },
        "reference_chars": {k: _length_stats([e.reference for e in selected["train"][k]]) for k in KINDS},
    }
    # No timings in the manifest: it must be byte-identical for the same seed.
    return write_data_dir(out_dir, train, evals, params=params, extra=extra)
