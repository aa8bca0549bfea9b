"""Run by tests/test_scale.py under `torchrun --nproc_per_node 2`: importance, Fisher and activation statistics of a
tiny Llama sharded across the processes with FSDP2 (torch's fully_shard on a CPU device mesh, gloo), saved by rank 0.

``python fsdp_statistics.py BASE FINETUNED OUT_DIR``. accelerate's FSDP plugin is not used here: on a CPU-only
machine accelerate treats several processes as MULTI_CPU and wraps models in DDP whatever the plugin says, so the
model is sharded with the call the plugin makes (``fully_shard`` per decoder layer, then the root).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from hf_sta import STAMerger  # noqa: E402
from tests.test_scale import calibration_rows  # noqa: E402


def main(base: str, finetuned: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)  # MULTI_CPU: the gloo process group of the torchrun processes
    mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    model = LlamaForCausalLM.from_pretrained(finetuned)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    merger = STAMerger.from_pretrained(base, {"code": finetuned})
    options = dict(model=model, accelerator=accelerator, show_progress=False, num_samples=None)
    taylor = merger.compute_importance("code", calibration_rows(), **options)
    fisher = merger.compute_importance("code", calibration_rows(), metric="fisher", **options)
    grams = merger.compute_activation_statistics("code", calibration_rows(), **options)
    assert taylor.num_samples == 6 and grams.num_samples == 6, (taylor.num_samples, grams.num_samples)
    local = model.model.layers[0].self_attn.q_proj.weight.to_local().shape  # a resharded (non-root) parameter
    if accelerator.is_main_process:
        out_dir = Path(out)
        taylor.save(out_dir / "taylor.safetensors")
        fisher.save(out_dir / "fisher.safetensors")
        grams.save(out_dir / "grams.safetensors")
        (out_dir / "shard.txt").write_text(f"{accelerator.num_processes} {list(local)}")
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
