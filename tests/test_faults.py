"""Regression tests for the defects of issue 18: bad inputs fail at load with an error naming the file, key or argument;
suspicious inputs are warned about; custom code survives a merge; nothing is half-written."""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from hf_sta import STAMerger
from hf_sta.errors import CalibrationDataError, CheckpointError, ConfigError
from hf_sta.importance import ActivationStatistics
from hf_sta.io.checkpoints import CheckpointReader


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# -- safetensors headers and shard indexes (defects 10, 13) -----------------------------------------------------------
def test_header_length_beyond_the_file_names_the_file(tmp_path, llama_checkpoints):
    folder = _copy(llama_checkpoints.finetuned["code"], tmp_path / "bad")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = struct.pack("<Q", 2**60)
    weights.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors' is not a valid safetensors file: its header length"
    ):
        CheckpointReader(folder)


def test_truncated_file_fails_at_load_not_mid_merge(tmp_path, llama_checkpoints):
    folder = _copy(llama_checkpoints.finetuned["code"], tmp_path / "bad")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"is truncated: tensor '.+' needs bytes up to \d+, but the file has"):
        STAMerger.from_pretrained(llama_checkpoints.base, {"code": folder})


def test_shard_index_may_not_point_outside_the_folder(tmp_path, llama_checkpoints):
    outside = _copy(llama_checkpoints.finetuned["code"], tmp_path / "outside")
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(outside / "config.json", folder)
    keys = list(load_file(outside / "model.safetensors"))
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "../outside/model.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"names shard '\.\./outside/model\.safetensors', which is outside"):
        CheckpointReader(folder)
    index["weight_map"] = dict.fromkeys(keys, str(outside / "model.safetensors"))  # absolute: refused too
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        CheckpointReader(folder)


# -- LoRA factors (defect 11) ----------------------------------------------------------------------------------------
def test_lora_b_inner_rank_is_checked_at_load(tmp_path, llama_checkpoints):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(llama_checkpoints.base)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if "layers.1" in k and "lora_B" in k)
    state[key] = torch.randn(state[key].shape[0], 3)
    save_file(state, weights)
    with pytest.raises(
        CheckpointError, match=r"layers\.1\.self_attn\.q_proj\.lora_B\.weight' .*shape \[32, 3\]: its inner"
    ):
        STAMerger.from_pretrained(llama_checkpoints.base, adapters={"chat": tmp_path / "lora"})


# -- calibration data (defects 12, 15) -------------------------------------------------------------------------------
def _rows(ids: torch.Tensor) -> DataLoader:
    return DataLoader([{"input_ids": ids, "labels": ids.clone()}], batch_size=1)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.tensor([1, 2, 300]), r"batch 0 \(input_ids \[1, 3\] int64, .*\): token ids range over \[1, 300\], but "
         r"the model's vocabulary has 96 entries"),
        (torch.ones(2, 3, dtype=torch.long), r"batch 0 \(input_ids \[1, 2, 3\] int64.*must be \[batch, sequence\]"),
    ],
)  # fmt: skip
def test_bad_calibration_batches_name_the_batch(llama_checkpoints, ids, message):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, {"code": llama_checkpoints.finetuned["code"]})
    with pytest.raises(CalibrationDataError, match=message):
        merger.compute_importance("code", _rows(ids), show_progress=False)
    with pytest.raises(CalibrationDataError, match=message):
        merger.compute_activation_statistics("code", _rows(ids), show_progress=False)


def test_failed_forward_is_reraised_with_the_batch(llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, {"code": llama_checkpoints.finetuned["code"]})
    rows = DataLoader([{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2])}], batch_size=1)
    with pytest.raises(
        CalibrationDataError, match=r"Calibration batch 0 \(input_ids \[1, 3\] int64, labels \[1, 2\] "
    ):
        merger.compute_importance("code", rows, show_progress=False)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_num_samples_below_one_is_named(llama_checkpoints, bad):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, {"code": llama_checkpoints.finetuned["code"]})
    with pytest.raises(
        ConfigError, match=rf"num_samples must be an integer >= 1 \(or None: all the data\), got {bad}"
    ):
        merger.compute_importance("code", _rows(torch.tensor([1, 2, 3])), num_samples=bad, show_progress=False)


def test_wrapper_prefix_is_named(tmp_path, llama_checkpoints):
    folder = _copy(llama_checkpoints.finetuned["code"], tmp_path / "ddp")
    state = load_file(folder / "model.safetensors")
    save_file({f"module.{k}": v for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"saved under the prefix 'module\.'"):
        STAMerger.from_pretrained(llama_checkpoints.base, {"code": folder})


# -- suspicious inputs are warned about (defects 14, 17) -------------------------------------------------------------
def test_same_checkpoint_twice_and_the_base_as_a_fine_tune_warn(tmp_path, llama_checkpoints, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_sta"):
        STAMerger.from_pretrained(llama_checkpoints.base, {"a": llama_checkpoints.finetuned["code"], "b": llama_checkpoints.finetuned["code"]})  # fmt: skip
    assert "Tasks 'a' and 'b' are the same checkpoint" in caplog.text
    caplog.clear()
    copy = _copy(llama_checkpoints.base, tmp_path / "base-copy")
    with caplog.at_level(logging.WARNING, logger="hf_sta"):
        STAMerger.from_pretrained(llama_checkpoints.base, {"same": copy, "code": llama_checkpoints.finetuned["code"]})
    assert "The task vector of 'same' is zero: its checkpoint" in caplog.text and "'code'" not in caplog.text


def test_untrained_adapter_warns(tmp_path, llama_checkpoints, caplog):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(llama_checkpoints.base)
    get_peft_model(base, LoraConfig(r=2, target_modules=["v_proj"])).save_pretrained(tmp_path / "fresh")
    with caplog.at_level(logging.WARNING, logger="hf_sta"):
        STAMerger.from_pretrained(llama_checkpoints.base, adapters={"fresh": tmp_path / "fresh"})
    assert "every lora_B of adapter" in caplog.text


def test_zero_scaling_forget_warns(tmp_path, llama_checkpoints, caplog):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, {"code": llama_checkpoints.finetuned["code"]})
    with caplog.at_level(logging.WARNING, logger="hf_sta"):
        merger.forget("code", method="negation", scaling=0.0, output_dir=tmp_path / "out")
    assert "nothing of task 'code' is removed" in caplog.text


# -- single files are not silently replaced (defect 9) ---------------------------------------------------------------
def test_activation_statistics_refuse_an_existing_file(tmp_path):
    stats = ActivationStatistics({"w": torch.eye(2)}, {"w": "out_in"}, num_tokens=3, num_samples=1)
    path = stats.save(tmp_path / "stats.safetensors")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        stats.save(path)
    ActivationStatistics({"w": 2 * torch.eye(2)}, {"w": "out_in"}, num_tokens=3, num_samples=1).save(
        path, overwrite=True
    )
    assert torch.equal(ActivationStatistics.load(path)["w"], 2 * torch.eye(2))


# -- custom code (defects 4, 16) -------------------------------------------------------------------------------------
_CONFIGURATION = """from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny-custom"
"""
_MODELING = """from transformers import LlamaForCausalLM

from .configuration_tiny import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


def _with_custom_code(folder: Path, target: Path) -> Path:
    target = _copy(folder, target)
    (target / "configuration_tiny.py").write_text(_CONFIGURATION)
    (target / "modeling_tiny.py").write_text(_MODELING)
    config = json.loads((target / "config.json").read_text())
    config.update(
        model_type="tiny-custom",
        architectures=["TinyCustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny.TinyCustomConfig",
            "AutoModel": "modeling_tiny.TinyCustomForCausalLM",
            "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM",
        },
    )
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture
def custom_code_checkpoints(tmp_path, llama_checkpoints, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    base = _with_custom_code(llama_checkpoints.base, tmp_path / "base")
    code = _with_custom_code(llama_checkpoints.finetuned["code"], tmp_path / "code")
    return base, code


def test_custom_code_files_travel_with_the_merge(tmp_path, custom_code_checkpoints):
    from transformers import AutoModelForCausalLM

    base, code = custom_code_checkpoints
    merger = STAMerger.from_pretrained(base, {"code": code}, trust_remote_code=True)
    out = merger.merge("task_arithmetic", scaling=0.5, output_dir=tmp_path / "merged")
    assert {"configuration_tiny.py", "modeling_tiny.py"} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM"
    expected = load_file(base / "model.safetensors")["lm_head.weight"] * 0.5 + 0.5 * load_file(code / "model.safetensors")["lm_head.weight"]  # fmt: skip
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], expected)


def test_adapter_output_of_custom_code_passes_the_merger_setting(tmp_path, custom_code_checkpoints):
    base, code = custom_code_checkpoints
    refused = STAMerger.from_pretrained(base, {"code": code})
    with pytest.raises(CheckpointError, match="auto_map"):  # refused at once, never a prompt on stdin
        refused.merge(output_dir=tmp_path / "refused", output_format="adapter", max_rank=2)
    assert not (tmp_path / "refused").exists()
    trusted = STAMerger.from_pretrained(base, {"code": code}, trust_remote_code=True)
    out = trusted.merge(output_dir=tmp_path / "adapter", output_format="adapter", max_rank=2)
    assert (out / "adapter_model.safetensors").is_file()


# -- frictions: max_length capped at the model's positions; adapter warnings -------------------------------------------
def test_importance_max_length_is_capped_at_the_model_positions(tmp_path, bert_checkpoints):
    """The default max_length 512 on a BERT with 64 positions: raw text is cut at 64 tokens instead of indexing past
    the position table."""
    import datasets

    from tests.test_fusion import word_tokenizer

    folder = _copy(bert_checkpoints.finetuned["news"], tmp_path / "news")
    words = [f"w{i}" for i in range(90)]
    word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], words, "[CLS] $A [SEP]").save_pretrained(folder)
    data = datasets.Dataset.from_dict({"text": [" ".join(words[:80])] * 2, "label": [0, 1]})
    merger = STAMerger.from_pretrained(bert_checkpoints.base, {"news": folder})
    scores = merger.compute_importance("news", data, show_progress=False)  # max_length defaults to 512
    assert scores.num_samples == 2
    with pytest.raises(CalibrationDataError, match="failed in the model"):  # what the cap prevents
        merger.compute_importance("news", data, show_progress=False, tokenizer=_uncapped(folder))


def _uncapped(folder: Path):
    """The folder's tokenizer, pretending the model had 512 positions: it returns 82-token rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    original = tokenizer.__call__

    def call(*args, **kwargs):
        kwargs["max_length"] = 512
        return original(*args, **kwargs)

    tokenizer.__call__ = call
    return _CallableTokenizer(tokenizer, call)


class _CallableTokenizer:
    def __init__(self, tokenizer, call) -> None:
        self._tokenizer, self._call = tokenizer, call

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_adapter_warnings_are_one_line_each(tmp_path, llama_checkpoints, caplog):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    with caplog.at_level(logging.WARNING, logger="hf_sta"):
        merger.merge(output_dir=tmp_path / "lora", output_format="adapter", max_rank=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # not one line per tensor left out
    assert warnings[0].startswith("5 delta(s) that are not weights of LoRA-able modules")
    assert "mean relative error of" in warnings[1] and "above 10%" in warnings[1]
