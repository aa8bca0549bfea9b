"""Run by tests/test_training_sam.py under `torchrun --nproc_per_node N`: 3 SAMTrainer steps on a 4-row batch, saved by rank 0.

``python sam_distributed.py OUT PER_DEVICE_BATCH``: with 2 processes and 2 rows each the global batch is the one
process's 4 rows; DDP all-reduces (averages) the gradients at both backward passes of every SAM step.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.test_training_sam import _args, _classification_rows, _tiny_classifier  # noqa: E402


def main(output: str, per_device_batch_size: int) -> None:
    from safetensors.torch import save_file

    from hf_sta.training import SAMTrainer

    model = _tiny_classifier()
    args = _args(Path(output).parent, per_device_train_batch_size=per_device_batch_size, max_steps=3)
    trainer = SAMTrainer(model=model, args=args, train_dataset=_classification_rows(4), sam_rho=0.05)
    trainer.model_accepts_loss_kwargs = False  # see tests/test_training_sam.py::_trained
    trainer.train()
    if trainer.accelerator.num_processes > 1:
        assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel", type(trainer.model_wrapped)
    if trainer.accelerator.is_main_process:
        save_file({k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}, output)
    # Every rank exits together: a rank that exits while rank 0 still saves can abort in gloo's thread destructors
    # ("terminate called without an active exception", seen once in a clean-clone run). destroy_process_group is
    # not called: on this CPU it hung rank 0 in about 1 of 20 runs.
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
