"""Shared fixtures: tiny transformers models built from configs, saved as base + fine-tuned checkpoints."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` and `tests` importable

from tests.hub_server import local_hub  # noqa: E402, F401  (fixture)


@dataclass
class Checkpoints:
    """A base checkpoint folder and fine-tuned folders keyed by task name."""

    base: Path
    finetuned: dict[str, Path]


def perturb_(model: torch.nn.Module, *, scale: float, seed: int, skip: tuple[str, ...] = ()) -> None:
    """Add ``scale * N(0, 1)`` noise to every floating parameter (a stand-in for fine-tuning)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not any(s in name for s in skip):
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    values = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    values.update(overrides)
    return BertConfig(**values)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture(scope="session")
def bert_checkpoints(tmp_path_factory) -> Checkpoints:
    """Base saved as a bare ``BertModel``; three ``BertForSequenceClassification`` fine-tunes (2, 3, 4 labels)."""
    from transformers import BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    base = BertModel(tiny_bert_config(), add_pooling_layer=True)
    base.save_pretrained(root / "base")
    finetuned = {}
    for index, (task, labels) in enumerate({"news": 2, "sentiment": 3, "topic": 4}.items()):
        torch.manual_seed(100 + index)
        model = BertForSequenceClassification(tiny_bert_config(num_labels=labels))
        model.bert.load_state_dict(base.state_dict())
        perturb_(model.bert, scale=0.02, seed=index)
        model.save_pretrained(root / task)
        finetuned[task] = root / task
    return Checkpoints(root / "base", finetuned)


@pytest.fixture(scope="session")
def llama_checkpoints(tmp_path_factory) -> Checkpoints:
    """A tiny ``LlamaForCausalLM`` base and three perturbed copies (fp32)."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    base.save_pretrained(root / "base")
    finetuned = {}
    for index, task in enumerate(("code", "math", "chat")):
        model = LlamaForCausalLM(tiny_llama_config())
        model.load_state_dict(base.state_dict())
        perturb_(model, scale=0.01, seed=10 + index)
        model.save_pretrained(root / task)
        finetuned[task] = root / task
    return Checkpoints(root / "base", finetuned)


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint folder (oracle side: plain safetensors, no hf_sta code)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def run_processes(num_processes: int, script: Path, *args: object, timeout: int = 300):
    """Run ``script`` in ``num_processes`` gloo CPU processes (``torch.distributed.run``, what ``accelerate launch
    --multi_gpu`` starts; ``accelerate launch --num_processes 2 --cpu`` would start one) on a free port, one torch
    thread each, with ``ACCELERATE_USE_CPU`` so that accelerate joins them as ``MULTI_CPU``. Returns the completed
    process; the caller checks ``returncode`` (``stderr`` holds the failure)."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
               "--master_port", port, str(script), *map(str, args)]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=root, env=environment)
