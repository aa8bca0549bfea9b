"""The bad-input / fault matrix of ``docs/fault-matrix.md``, case by case, through the command line.

Every case: exit status 2 (130 for SIGTERM), exactly one ``hf-sta: error: ...`` line on stderr naming the file, key or
argument, and no output folder (and no hidden build folder) left behind. ``test_the_document_lists_every_case`` keeps
the document and this file in step.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hf_sta.cli import main
from tests.conftest import load_state_dict

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "docs" / "fault-matrix.md"


# -- helpers ----------------------------------------------------------------------------------------------------------
class Case:
    """``tmp``: the test's folder; ``ckpt``: the tiny Llama checkpoints; ``out``: the output folder of the run."""

    def __init__(self, tmp: Path, checkpoints, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp, self.ckpt, self.monkeypatch = tmp, checkpoints, monkeypatch
        self.out = tmp / "out"

    def recipe(self, **changes) -> dict:
        recipe = {
            "base_model": str(self.ckpt.base),
            "models": {task: str(folder) for task, folder in self.ckpt.finetuned.items()},
            "merge": {"method": "task_arithmetic", "scaling": 0.5},
            "output_dir": str(self.out),
        }
        recipe.update(changes)
        return recipe

    def merge(self, recipe: dict | None = None, *extra: str) -> list[str]:
        path = self.tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe or self.recipe(), sort_keys=False))
        return ["merge", str(path), *extra]

    def finetune(self, name: str, change: Callable[[dict], None] | None = None) -> Path:
        """A copy of the 'code' fine-tune whose state dict went through ``change``."""
        folder = self.tmp / name
        shutil.copytree(self.ckpt.finetuned["code"], folder)
        if change is not None:
            state = load_file(folder / "model.safetensors")
            change(state)
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    def with_model(self, folder: Path) -> list[str]:
        return self.merge(self.recipe(models={"code": str(folder), "math": str(self.ckpt.finetuned["math"])}))

    def importance(self, data: Path, *extra: str) -> list[str]:
        base, code = str(self.ckpt.base), str(self.ckpt.finetuned["code"])
        output = str(self.tmp / "scores.safetensors")
        self.out = self.tmp / "scores.safetensors"
        return [
            "importance",
            "--base",
            base,
            "--model",
            f"code={code}",
            "--data",
            str(data),
            "--output",
            output,
            *extra,
        ]

    def jsonl(self, rows: list[dict]) -> Path:
        path = self.tmp / "data.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        state[key] = value(state[key])

    return change


def _poison(value: float) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        state["model.layers.0.mlp.up_proj.weight"][0, 0] = value

    return change


def _fail(monkeypatch, target: str, error: BaseException) -> None:
    def raising(*args, **kwargs):
        raise error

    monkeypatch.setattr(target, raising)


# -- the cases --------------------------------------------------------------------------------------------------------
def case_shape(c: Case):
    folder = c.finetune("ft", _set("model.norm.weight", lambda t: torch.ones(33)))
    return c.with_model(folder), r"Tensor 'model\.norm\.weight' of 'code' has shape \[33\] but the base 'base' has"


def case_architecture(c: Case):
    folder = c.finetune("ft")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    return c.with_model(folder), r"is a 'mistral' model but the base '.*' is 'llama'"


def case_nan(c: Case):
    folder = c.finetune("ft", _poison(float("nan")))
    return c.with_model(folder), r"Tensor 'model\.layers\.0\.mlp\.up_proj\.weight' of '.*' .* holds 1 NaN/inf value"


def case_inf(c: Case):
    folder = c.finetune("ft", _poison(float("inf")))
    return c.with_model(folder), r"up_proj\.weight' of .* holds 1 NaN/inf value"


def case_dtype(c: Case):
    folder = c.finetune("ft", _set("model.norm.weight", lambda t: t.to(torch.int32)))
    return c.with_model(folder), r"Tensor 'model\.norm\.weight' of '.*' has unsupported dtype torch\.int32"


def case_pickle(c: Case):
    folder = c.tmp / "pickled"
    folder.mkdir()
    shutil.copy(c.ckpt.finetuned["code"] / "config.json", folder)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    torch.save({"x": Payload()}, folder / "pytorch_model.bin")
    return c.with_model(folder), r"pytorch_model\.bin' .*unsupported GLOBAL .*system\); arbitrary pickles are refused"


def case_remote_code(c: Case):
    return c.merge(c.recipe(trust_remote_code=True)), r"trust_remote_code: '.*recipe\.yaml' .*pass --trust-remote-code"


def case_remote_code_config(c: Case):
    base = c.tmp / "custom-base"
    shutil.copytree(c.ckpt.base, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_x.X"}}))
    recipe = c.recipe(base_model=str(base), output_format="adapter", adapter={"max_rank": 2})
    return c.merge(recipe), r"config\.json' names custom model code \(auto_map: AutoModel\).*trust_remote_code"


def case_calibration_empty(c: Case):
    path = c.tmp / "empty.jsonl"
    path.write_text("")
    return c.importance(path), r"Calibration data file '.*empty\.jsonl' is empty"


def case_calibration_malformed(c: Case):
    path = c.tmp / "broken.jsonl"
    path.write_text('{"input_ids": [1, 2, 3]\n{oops\n')
    return c.importance(path), r"Calibration data file '.*broken\.jsonl' cannot be read as json: JSON parse error"


def case_calibration_vocabulary(c: Case):
    path = c.jsonl([{"input_ids": [1, 2, 500], "attention_mask": [1, 1, 1], "labels": [1, 2, 3]}])
    return c.importance(path), r"Calibration batch 0 \(input_ids \[1, 3\] int64.*\): token ids range over \[1, 500\]"


def case_calibration_no_text(c: Case):
    path = c.jsonl([{"sentence": "no tokenizer and no input_ids"}])
    return c.importance(path), r"No tokenizer found for task 'code'"


def case_num_samples(c: Case):
    path = c.jsonl([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [1, 2]}])
    return c.importance(path, "--num-samples", "0"), r"argument --num-samples: expected a positive integer, got '0'"


def case_yaml_syntax(c: Case):
    path = c.tmp / "recipe.yaml"
    path.write_text("merge: [unclosed\n")
    return ["merge", str(path)], r"'.*recipe\.yaml' is not valid YAML"


def case_yaml_typo(c: Case):
    recipe = c.recipe(merge={"method": "ties", "dens1ty": 0.2})
    return c.merge(recipe), r"merge\.dens1ty: unknown field; .*the parameters of method 'ties': density"


def case_yaml_value(c: Case):
    recipe = c.recipe(merge={"method": "ties", "density": 1.5})
    return c.merge(recipe), r"merge\.density must be in \(0, 1\], got 1\.5"


def case_output_exists(c: Case):
    c.out.mkdir()
    (c.out / "keep.txt").write_text("mine")
    c.keep = {"keep.txt"}
    return c.merge(), r"Output folder '.*out' exists and is not empty; pass --overwrite to replace it"


def case_output_holds_input(c: Case):
    c.out = c.ckpt.base.parent
    c.keep = {p.name for p in c.out.iterdir()}
    return c.merge(c.recipe(), "--output-dir", str(c.out), "--overwrite"), r"holds the input '.*'"


def case_output_is_input(c: Case):
    c.out = c.ckpt.base
    c.keep = {p.name for p in c.out.iterdir()}
    return c.merge(c.recipe(), "--output-dir", str(c.out), "--overwrite"), r"is the input 'base'"


def case_output_is_cwd(c: Case):
    c.out = c.tmp / "work"
    c.out.mkdir()
    c.keep = set()
    c.monkeypatch.chdir(c.out)
    return c.merge(
        c.recipe(), "--output-dir", ".", "--overwrite"
    ), r"Output folder '\.' \('.*work'\) is the current dir"


def case_no_permission(c: Case):
    _fail(c.monkeypatch, "tempfile.mkdtemp", PermissionError(errno.EACCES, "Permission denied", str(c.tmp)))
    return c.merge(), r"Permission denied: '.*'"


def case_read_only(c: Case):
    _fail(c.monkeypatch, "tempfile.mkdtemp", OSError(errno.EROFS, "Read-only file system", str(c.tmp)))
    return c.merge(), r"Read-only file system: '.*'"


def case_disk_full(c: Case):
    error = OSError(errno.ENOSPC, "No space left on device", str(c.tmp / "model.safetensors"))
    _fail(c.monkeypatch, "hf_sta.io.checkpoints.StreamingSafetensorsWriter._write_bytes", error)
    return c.merge(), r"No space left on device: '.*model\.safetensors'"


def case_out_of_memory(c: Case):
    _fail(c.monkeypatch, "hf_sta.task_vector.CheckpointTaskVector._delta_into", MemoryError())
    return c.merge(), r"out of memory"


def case_hub_offline(c: Case):
    recipe = c.recipe(base_model="nobody/not-in-the-cache")
    return c.merge(recipe), r"Checkpoint 'nobody/not-in-the-cache' is not a local folder and could not be fetched"


def case_hub_unreachable(c: Case):
    from tests.hub_server import patch_huggingface_hub

    patch_huggingface_hub(c.monkeypatch, "http://127.0.0.1:9", c.tmp / "hf_home")
    folder = c.ckpt.finetuned["code"]
    return ["push", str(folder), "me/model"], r"ConnectError: .*Connection refused \(while contacting the Hub at http"


def case_hub_xet(c: Case):
    error = ConnectionError("Failed to connect to the Xet storage service")  # huggingface_hub 2.x's Xet uploads
    _fail(c.monkeypatch, "hf_sta.hub.push_folder", error)
    return [
        "push",
        str(c.ckpt.finetuned["code"]),
        "me/model",
    ], r"ConnectionError: Failed to connect to the Xet .*while contacting the Hub"


def case_bad_repo_id(c: Case):
    return ["push", str(c.ckpt.finetuned["code"]), "me/a/b"], r"repo_id: Repo id must be in the form"


def case_no_token(c: Case):
    c.monkeypatch.delenv("HF_TOKEN")
    return ["push", str(c.ckpt.finetuned["code"]), "me/model"], r"HfHubHTTPError: .*401"


def case_upload_fails(c: Case):
    import tempfile

    c.monkeypatch.setattr(tempfile, "tempdir", str(c.tmp))  # the kept folder goes under the test's folder
    c.hub.fail_next_commits(5)
    recipe = c.recipe(push_to_hub="me/model")
    del recipe["output_dir"]
    return c.merge(recipe), r"HfHubHTTPError: .*500.*The result was kept in '.*'; retry with `hf-sta push "


def case_header_corrupt(c: Case):
    folder = c.finetune("ft")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[:8] = (2**60).to_bytes(8, "little")
    (folder / "model.safetensors").write_bytes(bytes(data))
    return c.with_model(folder), r"model\.safetensors' is not a valid safetensors file: its header length field"


def case_truncated(c: Case):
    folder = c.finetune("ft")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-64])
    return c.with_model(folder), r"model\.safetensors' is truncated: tensor '.*' needs bytes up to"


def case_shard_outside(c: Case):
    folder = c.tmp / "sharded"
    folder.mkdir()
    shutil.copy(c.ckpt.finetuned["code"] / "config.json", folder)
    index = {"weight_map": {"lm_head.weight": "../../etc/model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return c.with_model(folder), r"names shard '\.\./\.\./etc/model\.safetensors', which is outside the checkpoint"


def case_lora_rank(c: Case):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    adapter = c.tmp / "lora"
    get_peft_model(LlamaForCausalLM.from_pretrained(c.ckpt.base), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)  # fmt: skip
    state = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in state if "lora_B" in k)
    state[key] = torch.zeros(state[key].shape[0], 2)
    save_file(state, adapter / "adapter_model.safetensors")
    recipe = c.recipe(models={}, adapters={"chat": str(adapter)})
    return c.merge(
        recipe
    ), r"lora_B\.weight' of adapter file '.*' has shape \[32, 2\]: its inner dimension 2 should be"


CASES = {name.removeprefix("case_").replace("_", "-"): case for name, case in dict(globals()).items() if name.startswith("case_")}  # fmt: skip
HUB_CASES = {"upload-fails", "no-token"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_case(name, tmp_path, llama_checkpoints, monkeypatch, capsys, request):
    case = Case(tmp_path, llama_checkpoints, monkeypatch)
    case.keep = None
    if name in HUB_CASES:
        case.hub = request.getfixturevalue("local_hub")
    argv, message = CASES[name](case)
    before = sorted(p.name for p in case.out.parent.iterdir()) if case.out.parent.is_dir() else []
    capsys.readouterr()  # what the case's own set-up printed
    status = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("hf-sta: error: "), err
    assert re.search(message, lines[0]), lines[0]
    if case.keep is None:
        assert not case.out.exists(), f"{case.out} was written"
    else:
        assert {p.name for p in case.out.iterdir()} == case.keep
    after = sorted(p.name for p in case.out.parent.iterdir()) if case.out.parent.is_dir() else []
    assert [n for n in after if n.startswith(".") and n not in before] == [], "a build folder was left behind"


_KILL_SCRIPT = """
import os, signal, sys
from hf_sta.io import checkpoints
original = checkpoints.StreamingSafetensorsWriter._write_bytes
def write_then_die(self, *args, **kwargs):
    original(self, *args, **kwargs)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
checkpoints.StreamingSafetensorsWriter._write_bytes = write_then_die
from hf_sta.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_case_killed_mid_write(sig, tmp_path, llama_checkpoints, monkeypatch, capsys):
    """kill -9 / SIGTERM after the first tensor is written: no output folder; SIGTERM cleans up at once (exit 130),
    SIGKILL leaves a hidden build folder that the next write of the same output removes."""
    case = Case(tmp_path, llama_checkpoints, monkeypatch)
    argv = case.merge()
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, sig, *argv], capture_output=True, text=True, cwd=ROOT, env=environment, timeout=120)  # fmt: skip
    assert not case.out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    if sig == "SIGTERM":
        assert result.returncode == 130 and result.stderr.strip().splitlines()[-1] == "hf-sta: interrupted"
        assert leftovers == []
    else:
        assert result.returncode == -signal.SIGKILL and len(leftovers) == 1
        assert main(argv) == 0  # the next run removes the dead writer's folder and writes a complete output
        assert "Removed" in capsys.readouterr().err and not any(p.name.startswith(".out.") for p in tmp_path.iterdir())
        assert len(load_state_dict(case.out)) == len(load_file(llama_checkpoints.base / "model.safetensors"))


def test_the_document_lists_every_case():
    text = DOCUMENT.read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.MULTILINE)
    assert sorted(rows) == sorted([*CASES, "killed-mid-write"]), "docs/fault-matrix.md and this file disagree"
