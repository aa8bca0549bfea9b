"""Run by tests/test_activations.py in N processes (`torch.distributed.run`): input Gram matrices of a tiny BERT, saved by rank 0."""

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader

from hf_sta.importance import ActivationStatistics, accumulate_input_grams


def build_model():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50
    )
    return BertModel(config).eval()


def build_loader(batch_size: int = 2) -> DataLoader:
    """Ten rows of varying length, right-padded to 9 tokens (mask 0 on padding)."""
    generator = torch.Generator().manual_seed(1)
    lengths = [9, 4, 7, 2, 9, 5, 6, 3, 8, 1]
    rows = []
    for length in lengths:
        ids = torch.zeros(9, dtype=torch.long)
        ids[:length] = torch.randint(1, 50, (length,), generator=generator)
        mask = torch.zeros(9, dtype=torch.long)
        mask[:length] = 1
        rows.append({"input_ids": ids, "attention_mask": mask})
    return DataLoader(rows, batch_size=batch_size, shuffle=False)


def main(output: str, num_processes: str) -> None:
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(even_batches=False))
    assert accelerator.num_processes == int(num_processes), (accelerator.num_processes, num_processes)
    loader = accelerator.prepare_data_loader(build_loader())
    grams, layouts, num_tokens, num_samples = accumulate_input_grams(
        build_model(), loader, accelerator=accelerator, progress=False
    )
    assert num_samples == 10, num_samples
    if accelerator.is_main_process:
        ActivationStatistics(grams, layouts, num_tokens, num_samples).save(output)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
