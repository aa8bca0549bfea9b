"""Task suites: the six-task benchmark and two further suites from other domains, all read from installed packages.

A *suite* is a fixed set of tasks merged together (one merged body, a head per task). ``text6`` is the six-task
benchmark of :mod:`benchmarks.tasks`; the two suites below come from different domains and from Debian packages
(``make suite-assets`` installs them; nothing is downloaded at run time and nothing is copied into this repository):

| suite | task | source (Debian package) | label ids | pool (balanced) |
|---|---|---|---|---|
| ``fortunes`` | ``fortune_topic`` | ``fortunes``: ``/usr/share/games/fortunes/{computers,politics,science,work}`` | 0 computers, 1 politics, 2 science, 3 work | 4 x 625 |
| ``fortunes`` | ``fortune_language`` | ``fortunes``/``fortunes-min`` (English), ``fortunes-de``, ``fortunes-es``, ``fortunes-it`` | 0 English, 1 German, 2 Spanish, 3 Italian | 4 x 1000 |
| ``fortunes`` | ``fortune_genre`` | ``fortunes``: ``definitions``, ``people``, ``songs-poems`` | 0 definitions, 1 people, 2 songs-poems | 3 x 715 |
| ``wordnet`` | ``wordnet_pos`` | ``wordnet-base``: the gloss of every synset of ``data.{noun,verb,adj,adv}`` | 0 noun, 1 verb, 2 adjective, 3 adverb | 4 x 1000 |
| ``wordnet`` | ``wordnet_noun`` | same, noun glosses by lexicographer file | 0 animal, 1 artifact, 2 food, 3 person, 4 plant | 5 x 1000 |
| ``wordnet`` | ``wordnet_verb`` | same, verb glosses by lexicographer file | 0 change, 1 communication, 2 contact, 3 motion, 4 social | 5 x 1000 |

(Pool sizes are those of Debian bookworm's packages and are recorded by ``load_task``'s log; a fortune is the text
between two ``%`` lines, with whitespace runs collapsed and terminal overstrike removed; a WordNet gloss is the text
after ``|`` up to its first quoted example, without the lemmas, so a task cannot be solved by reading a word list.)

Protocol: the same as :func:`benchmarks.tasks.load_task` (read in a stable order, deduplicate, stratified split of
test / validation / train, seed 0 canonical) with one step more: every class is **balanced** to the same size
before splitting — the first ``min(smallest class, cap)`` texts of each class in a seeded shuffle (``cap`` is 1000).
The sources are very unbalanced (82k noun glosses against 3.6k adverbs; 17k Italian fortunes), and a balanced pool
keeps chance at ``1 / classes`` and the splits small.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import numpy as np

SUITES: dict[str, tuple[str, ...]] = {
    "text6": ("news", "movie_sentiment", "subjectivity", "debate_party", "tweet_sentiment", "product_sentiment"),
    "fortunes": ("fortune_topic", "fortune_language", "fortune_genre"),
    "wordnet": ("wordnet_pos", "wordnet_noun", "wordnet_verb"),
}
"""Every suite and its tasks, in the order they are reported."""

FORTUNE_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
DEBIAN_PACKAGES = ("fortunes", "fortunes-min", "fortunes-de", "fortunes-es", "fortunes-it", "wordnet-base")
BALANCE_CAP = 1000

FORTUNE_TOPICS = ("computers", "politics", "science", "work")
FORTUNE_GENRES = ("definitions", "people", "songs-poems")
FORTUNE_LANGUAGES = {"English": None, "German": "de", "Spanish": "es", "Italian": "it"}
# English cookie files of the `fortunes` and `fortunes-min` packages (the top folder also holds links to Italian ones)
FORTUNE_ENGLISH = (
    "art", "computers", "cookie", "definitions", "drugs", "education", "ethnic", "food", "fortunes", "goedel",
    "humorists", "kids", "law", "linux", "literature", "love", "magic", "medicine", "men-women", "miscellaneous",
    "news", "people", "pets", "platitudes", "politics", "riddles", "science", "songs-poems", "sports", "startrek",
    "wisdom", "work", "zippy",
)  # fmt: skip

WORDNET_POS = {"noun": "noun", "verb": "verb", "adjective": "adj", "adverb": "adv"}
# lexicographer file numbers (WordNet's lexnames(5)) of the classes used
WORDNET_NOUN_FILES = {"animal": 5, "artifact": 6, "food": 13, "person": 18, "plant": 20}
WORDNET_VERB_FILES = {"change": 30, "communication": 32, "contact": 35, "motion": 38, "social": 41}

EXTRA_LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "fortune_topic": FORTUNE_TOPICS,
    "fortune_language": tuple(FORTUNE_LANGUAGES),
    "fortune_genre": FORTUNE_GENRES,
    "wordnet_pos": tuple(WORDNET_POS),
    "wordnet_noun": tuple(WORDNET_NOUN_FILES),
    "wordnet_verb": tuple(WORDNET_VERB_FILES),
}
"""Label names of the tasks outside ``text6`` (all balanced, see the module docstring)."""

_OVERSTRIKE = re.compile(".\x08")
_WHITESPACE = re.compile(r"\s+")

Records = tuple[tuple[str, int], ...]


def suite_of(task: str) -> str:
    """The suite ``task`` belongs to."""
    for suite, tasks in SUITES.items():
        if task in tasks:
            return suite
    raise ValueError(f"Task {task!r} is in no suite; known suites: {SUITES}.")


def _missing(path: Path, package: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{path} not found: install the Debian package with `apt-get install -y {package}` "
        f"(or `make suite-assets`, which installs {' '.join(DEBIAN_PACKAGES)})."
    )


def _cookies(path: Path) -> list[str]:
    """The fortunes of one cookie file: texts between ``%`` lines, overstrike removed, whitespace collapsed."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # a few older cookie files are Latin-1
        text = raw.decode("latin-1")
    cookies = []
    for chunk in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        cleaned = _WHITESPACE.sub(" ", _OVERSTRIKE.sub("", chunk)).strip()
        if cleaned:
            cookies.append(cleaned)
    return cookies


def _cookie_file(name: str, package: str = "fortunes") -> Path:
    path = FORTUNE_DIR / name
    if not path.is_file():
        raise _missing(path, package)
    return path


def _language_files(code: str | None) -> list[Path]:
    if code is None:
        return [_cookie_file(name, "fortunes-min") for name in FORTUNE_ENGLISH if (FORTUNE_DIR / name).is_file()]
    folder = FORTUNE_DIR / code
    if not folder.is_dir():
        raise _missing(folder, f"fortunes-{code}")
    # cookie files are those with a strfile index (.dat) or, for de, a UTF-8 copy (.u8); off/ is the offensive part
    names = {p.name.removesuffix(".dat").removesuffix(".u8") for p in folder.iterdir() if p.suffix in (".dat", ".u8")}
    return [folder / name for name in sorted(names) if (folder / name).is_file()]


@cache
def _read_fortunes(task: str) -> Records:
    if task == "fortune_language":
        groups = [_language_files(code) for code in FORTUNE_LANGUAGES.values()]
    else:
        names = FORTUNE_TOPICS if task == "fortune_topic" else FORTUNE_GENRES
        groups = [[_cookie_file(name)] for name in names]
    return tuple((text, label) for label, paths in enumerate(groups) for path in paths for text in _cookies(path))


def _glosses(pos: str) -> list[tuple[int, str]]:
    """``(lexicographer file number, gloss)`` of every synset of ``data.<pos>``, in file order."""
    path = WORDNET_DIR / f"data.{pos}"
    if not path.is_file():
        raise _missing(path, "wordnet-base")
    rows = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("  ") or "|" not in line:  # the license header lines start with two spaces
                continue
            fields, gloss = line.split("|", 1)
            definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
            if definition:
                rows.append((int(fields.split()[1]), definition))
    return rows


@cache
def _read_wordnet(task: str) -> Records:
    if task == "wordnet_pos":
        return tuple((gloss, label) for label, pos in enumerate(WORDNET_POS.values()) for _, gloss in _glosses(pos))
    pos, files = ("noun", WORDNET_NOUN_FILES) if task == "wordnet_noun" else ("verb", WORDNET_VERB_FILES)
    label_of = {number: label for label, number in enumerate(files.values())}
    return tuple((gloss, label_of[number]) for number, gloss in _glosses(pos) if number in label_of)


def read_extra_records(task: str) -> Records:
    """``(text, label)`` records of a task outside ``text6``, in a stable order, before deduplication."""
    if task.startswith("fortune_") and task in EXTRA_LABEL_NAMES:
        return _read_fortunes(task)
    if task.startswith("wordnet_") and task in EXTRA_LABEL_NAMES:
        return _read_wordnet(task)
    raise ValueError(f"Unknown task {task!r}; expected one of {sorted(EXTRA_LABEL_NAMES)}.")


def balance(pool: list[tuple[str, int]], num_classes: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    """The same number of records per class: ``min(smallest class, BALANCE_CAP)`` drawn by ``rng`` from each class
    (without replacement, kept in source order)."""
    by_class = [[record for record in pool if record[1] == label] for label in range(num_classes)]
    size = min(BALANCE_CAP, *(len(records) for records in by_class))
    balanced = []
    for records in by_class:
        chosen = np.sort(rng.choice(len(records), size=size, replace=False))
        balanced += [records[index] for index in chosen]
    return balanced
