"""Real English text for calibration, training and evaluation, from two unrelated sources.

* :func:`docstring_sentences` — sentences of the docstrings of Python's standard library
  (always installed): technical prose, used to calibrate and heal.
* :func:`fortune_sentences` — quotations from Debian's ``fortunes`` package
  (``apt-get install fortunes`` puts them in ``/usr/share/games/fortunes``): literature,
  wisdom, people, science, small talk; used only to evaluate.

The sources differ in author, topic and style, and :func:`disjoint` checks that no sentence
is in both. Selection is seeded and sorted, so a run sees the same sentences every time.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import subprocess
import sys
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
#: fortune files of prose quotations (no ASCII art, no offensive set, no jokes in dialect)
FORTUNE_FILES = (
    "literature", "wisdom", "people", "science", "education", "food", "work", "love",
    "politics", "medicine", "platitudes", "humorists", "men-women", "pets", "sports",
)  # fmt: skip
#: standard library modules whose docstrings are prose, not tables of options
STDLIB_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "contextlib", "copy", "csv", "datetime", "decimal", "difflib", "email", "enum",
    "fractions", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "html",
    "http.client", "imaplib", "inspect", "ipaddress", "itertools", "json", "locale",
    "logging", "mailbox", "multiprocessing", "numbers", "operator", "optparse", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "selectors", "shelve",
    "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
    "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "xml.dom",
    "zipfile", "zoneinfo",
)  # fmt: skip

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORDY = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]+[.!?]$")


def sentences_of(text: str) -> list[str]:
    """Sentences of ``text`` with 6..30 words of plain prose (no code, no markup)."""
    flat = " ".join(text.split())
    out = []
    for s in _SENTENCE.split(flat):
        s = s.strip()
        if 6 <= len(s.split()) <= 30 and _WORDY.match(s) and "  " not in s:
            out.append(s)
    return out


def module_sentences(names: tuple[str, ...], *, own_only: bool) -> set[str]:
    """Sentences of the docstrings of the modules ``names`` and of their public members
    (``own_only``: only members defined in that module, not ones it re-exports). A module
    that fails to import, or a member whose docstring cannot be read, is skipped. Members
    that are modules are skipped too: a package lists whichever submodules some earlier
    import loaded, so reading them made the pool depend on the process's import history."""
    found: set[str] = set()
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a third-party package may fail with anything on import
            continue
        members = (getattr(mod, k, None) for k in sorted(dir(mod)) if k[:1] != "_")
        for obj in [mod, *(m for m in members if not inspect.ismodule(m))]:
            try:
                doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            except Exception:
                doc = None
            own = inspect.ismodule(obj) or getattr(obj, "__module__", "") == mod.__name__
            if doc and (own or not own_only):
                found.update(sentences_of(doc))
    return found


def docstring_pool() -> list[str]:
    """Every usable sentence of the standard library's docstrings, sorted. Read in a fresh
    interpreter: libraries imported earlier patch stdlib functions (after ``import torch``,
    one of ``inspect``'s is a wrapper defined elsewhere), which changed the pool."""
    code = "import json, realtext; print(json.dumps(realtext._stdlib_pool()))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def _stdlib_pool() -> list[str]:
    return sorted(module_sentences(STDLIB_MODULES, own_only=True))


def docstring_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct sentences from the standard library's docstrings (seeded choice)."""
    return _pick(docstring_pool(), n, seed, "standard library docstrings")


WORDNET = Path("/usr/share/wordnet")
_EXAMPLE = re.compile(r'"([^"]+)"')


def wordnet_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct example sentences of WordNet's glosses (``apt-get install
    wordnet-base``): everyday English written by lexicographers ("she writes books for
    children"), capitalised and given a full stop, 6..30 words (seeded choice)."""
    if not WORDNET.is_dir():
        raise SystemExit(
            f"text is missing: {WORDNET} does not exist; install WordNet's database with "
            "`apt-get install wordnet-base`"
        )
    return _pick(wordnet_pool(), n, seed, f"WordNet examples in {WORDNET}")


def wordnet_pool() -> list[str]:
    """Every usable WordNet example sentence, sorted."""
    found: set[str] = set()
    for part in ("noun", "verb", "adj", "adv"):
        f = WORDNET / f"data.{part}"
        if not f.is_file():
            continue
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:  # the licence header
                continue
            for ex in _EXAMPLE.findall(line.split("|", 1)[1]):
                ex = ex.strip()
                if not ex:
                    continue
                ex = ex[0].upper() + ex[1:]
                if ex[-1] not in ".!?":
                    ex += "."
                found.update(sentences_of(ex))
    return sorted(found)


def fortune_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct quotations (one sentence each) from Debian's ``fortunes``."""
    if not FORTUNES.is_dir():
        raise SystemExit(
            f"evaluation text is missing: {FORTUNES} does not exist; install Debian's "
            "quotations with `apt-get install fortunes`"
        )
    found: set[str] = set()
    for name in FORTUNE_FILES:
        f = FORTUNES / name
        if not f.is_file():
            continue
        for entry in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            body = entry.split("\n\t\t--")[0].split("\n\t--")[0]  # drop the attribution
            found.update(sentences_of(body))
    return _pick(sorted(found), n, seed, f"fortunes in {FORTUNES}")


def _pick(pool: list[str], n: int, seed: int, what: str) -> list[str]:
    if len(pool) < n:
        raise SystemExit(f"only {len(pool)} usable sentences in {what}, {n} asked")
    return random.Random(seed).sample(pool, n)


def disjoint(*sets: list[str]) -> None:
    """Raise if any sentence appears in two of ``sets``."""
    seen: dict[str, int] = {}
    for i, s in enumerate(sets):
        for x in s:
            if seen.setdefault(x, i) != i:
                raise SystemExit(f"sentence in sets {seen[x]} and {i}: {x!r}")
