"""STAMerger with PEFT LoRA adapters: merging into the base or into a new adapter, importance, reversible forgetting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from hf_sta import STAMerger
from tests.conftest import load_state_dict


def _adapter(base_dir: Path, folder: Path, seed: int, targets=("q_proj", "v_proj", "down_proj")) -> Path:
    from transformers import LlamaForCausalLM

    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets))
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(folder)
    return folder


def _merged_by_peft(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir)
    return model.merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, llama_checkpoints) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "sql": _adapter(llama_checkpoints.base, root / "sql", 1),
        "poems": _adapter(llama_checkpoints.base, root / "poems", 2, targets=("q_proj", "k_proj", "up_proj")),
    }


def test_adapters_merge_into_the_base_like_peft(tmp_path, llama_checkpoints, adapters):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, adapters=adapters)
    out = merger.merge(method="task_arithmetic", scaling=0.6, output_dir=tmp_path / "full")
    merged = load_state_dict(out)
    base = load_state_dict(llama_checkpoints.base)
    oracle = {name: _merged_by_peft(llama_checkpoints.base, path) for name, path in adapters.items()}
    for key, theta_0 in base.items():
        expected = theta_0 + 0.6 * sum(o[key] - theta_0 for o in oracle.values())
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6, msg=key)
    touched = [k for k in base if not torch.equal(merged[k], base[k])]
    assert touched and all(
        any(m in k for m in ("q_proj", "v_proj", "down_proj", "k_proj", "up_proj")) for k in touched
    )


def test_mixed_finetuned_and_adapters(llama_checkpoints, adapters):
    merger = STAMerger.from_pretrained(
        llama_checkpoints.base, {"code": llama_checkpoints.finetuned["code"]}, adapters={"sql": adapters["sql"]}
    )
    assert merger.tasks == ["code", "sql"]
    model = merger.merge(method="task_arithmetic")
    base = load_state_dict(llama_checkpoints.base)
    code = load_state_dict(llama_checkpoints.finetuned["code"])
    sql = _merged_by_peft(llama_checkpoints.base, adapters["sql"])
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(model.state_dict()[key], code[key] + sql[key] - base[key], rtol=1e-5, atol=1e-6)


def test_merge_into_a_new_adapter_is_the_best_rank_r_approximation(tmp_path, llama_checkpoints, adapters):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, adapters=adapters)
    folder = merger.merge(method="task_arithmetic", output_dir=tmp_path / "lora", output_format="adapter", max_rank=3)
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert (folder / "README.md").exists() or (folder / "hf_sta_config.yaml").exists()
    from transformers import LlamaForCausalLM

    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_checkpoints.base), folder)
    merged = reloaded.merge_and_unload().state_dict()
    base = load_state_dict(llama_checkpoints.base)
    oracle = {name: _merged_by_peft(llama_checkpoints.base, path) for name, path in adapters.items()}
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        delta = sum(o[key] - base[key] for o in oracle.values())
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(merged[key] - base[key], best.float(), rtol=1e-4, atol=1e-5)
    assert merger.last_adapter_report.max_relative_error > 0  # q_proj holds rank 8 (two adapters): truncated


def test_forget_as_adapter_is_reversible(tmp_path, llama_checkpoints, adapters):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, adapters=adapters)
    merger.compute_importance("sql", metric="magnitude")
    full = merger.forget("sql", scaling=0.8, density=0.3)
    model = merger.forget("sql", scaling=0.8, density=0.3, as_adapter=True, energy=1.0)
    assert isinstance(model, PeftModel)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM.from_pretrained(llama_checkpoints.base)
    with torch.no_grad():
        enabled = model(input_ids=ids).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
        expected_enabled = full(input_ids=ids).logits
        expected_disabled = original(input_ids=ids).logits
    torch.testing.assert_close(enabled, expected_enabled, rtol=1e-4, atol=1e-5)
    assert torch.equal(disabled, expected_disabled)  # switched off: exactly the original model
    assert not torch.allclose(enabled, disabled)


def test_importance_of_an_adapter_task_uses_the_adapted_weights(llama_checkpoints, adapters):
    from datasets import Dataset

    ids = torch.randint(1, 95, (4, 6), generator=torch.Generator().manual_seed(3))
    data = Dataset.from_dict({"input_ids": ids.tolist()})
    merger = STAMerger.from_pretrained(llama_checkpoints.base, adapters=adapters)

    def collate(rows):
        batch = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": batch, "labels": batch}

    scores = merger.compute_importance(
        "sql", data, micro_batch_size=4, num_samples=None, collate_fn=collate, show_progress=False
    )
    from transformers import LlamaForCausalLM

    oracle = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_checkpoints.base), adapters["sql"])
    oracle = oracle.merge_and_unload()
    oracle.eval()
    oracle.requires_grad_(True)  # PEFT froze the base weights
    oracle(input_ids=ids, labels=ids).loss.backward()
    params = dict(oracle.named_parameters())
    for key in scores.keys():
        torch.testing.assert_close(
            scores[key], (params[key].detach() * params[key].grad).abs(), rtol=1e-4, atol=1e-9, msg=key
        )
    assert "model.layers.0.self_attn.q_proj.weight" in scores.keys()
    assert "model.layers.0.self_attn.o_proj.weight" not in scores.keys()  # not adapted: not part of the task vector
