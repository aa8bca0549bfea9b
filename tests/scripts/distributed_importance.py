"""Run by tests/test_importance.py in N processes (`torch.distributed.run`): importance of one task, saved by the main process."""

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from datasets import Dataset

from hf_sta import STAMerger


def main(base: str, finetuned: str, output: str, num_processes: str) -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (12, 7), generator=generator)
    labels = torch.randint(0, 2, (12,), generator=generator)
    dataset = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "label": labels.tolist()}
    )
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(even_batches=False))
    assert accelerator.num_processes == int(num_processes), (accelerator.num_processes, num_processes)
    merger = STAMerger.from_pretrained(base, {"news": finetuned})
    scores = merger.compute_importance(
        "news", dataset, micro_batch_size=2, num_samples=None, accelerator=accelerator, show_progress=False
    )
    assert scores.micro_batches == 6, scores.micro_batches
    if accelerator.is_main_process:
        merger.save_importance("news", output)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:5])
