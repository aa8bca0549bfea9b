"""``hf-sta`` called in-process: recipes end to end on tiny models, errors, help, inspect, push, importance."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import snapshot_download

from hf_sta import STAMerger
from hf_sta.cli import main
from hf_sta.importance import ImportanceScores
from hf_sta.methods import get_merge_method, list_merge_methods
from hf_sta.recipe import Recipe, load_calibration_data
from tests.conftest import load_state_dict


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def llama_recipe(checkpoints, output_dir: Path, **merge) -> dict:
    return {
        "base_model": str(checkpoints.base),
        "models": {task: str(folder) for task, folder in checkpoints.finetuned.items()},
        "merge": merge or {"method": "ties", "scaling": 0.9, "density": 0.5},
        "output_dir": str(output_dir),
    }


def write_tokenized_jsonl(path: Path, *, rows: int, length: int, vocab: int, seed: int, labels: str) -> Path:
    """Pre-tokenized calibration data (the tiny fixtures have no tokenizer): equal lengths, default collator."""
    generator = torch.Generator().manual_seed(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            ids = torch.randint(1, vocab, (length,), generator=generator).tolist()
            row = {"input_ids": ids, "attention_mask": [1] * length}
            row.update({"labels": ids} if labels == "lm" else {"label": int(torch.randint(0, 2, (1,)).item())})
            handle.write(json.dumps(row) + "\n")
    return path


def assert_same_weights(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    saved = load_state_dict(folder)
    assert set(saved) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0, msg=key)


def test_merge_from_yaml_equals_the_merger(tmp_path, llama_checkpoints, capsys):
    out = tmp_path / "merged"
    config = write_recipe(tmp_path / "recipe.yaml", llama_recipe(llama_checkpoints, out))
    assert main(["merge", str(config)]) == 0
    assert f"Wrote {out}" in capsys.readouterr().out
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    expected = merger.merge(method="ties", scaling=0.9, density=0.5).state_dict()
    assert_same_weights(out, expected)
    # The recipe written next to the weights runs again: `hf-sta merge hf_sta_config.yaml`.
    again = tmp_path / "again"
    assert main(["merge", str(out / "hf_sta_config.yaml"), "--output-dir", str(again)]) == 0
    assert_same_weights(again, expected)
    # --overwrite replaces an existing output.
    assert main(["merge", str(config), "--overwrite"]) == 0


def test_merge_sta_with_calibration_data(tmp_path, llama_checkpoints):
    data = {
        task: write_tokenized_jsonl(tmp_path / f"{task}.jsonl", rows=6, length=8, vocab=96, seed=i, labels="lm")
        for i, task in enumerate(("code", "math"))
    }
    recipe = llama_recipe(llama_checkpoints, tmp_path / "merged", method="sta", tasks=["code", "math"], density=0.3)
    recipe["importance"] = {
        task: {"data": str(path), "num_samples": 4, "micro_batch_size": 2} for task, path in data.items()
    }
    assert main(["merge", str(write_recipe(tmp_path / "recipe.yaml", recipe))]) == 0

    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    for task in data:
        dataset = load_calibration_data(Recipe.from_dict(recipe).importance[task])
        merger.compute_importance(task, dataset, num_samples=4, micro_batch_size=2, show_progress=False)
    expected = merger.merge(method="sta", tasks=["code", "math"], density=0.3).state_dict()
    assert_same_weights(tmp_path / "merged", expected)


def test_forget_from_yaml_equals_the_merger(tmp_path, llama_checkpoints, capsys):
    recipe = {
        "base_model": str(llama_checkpoints.base),
        "models": {"code": str(llama_checkpoints.finetuned["code"])},
        "importance": {"code": {"metric": "magnitude"}},
        "forget": {"task": "code", "scaling": 0.7, "target": "code", "density": 0.25},
        "output_dir": str(tmp_path / "forgot"),
    }
    config = write_recipe(tmp_path / "forget.yaml", recipe)
    assert main(["forget", str(config)]) == 0
    assert "Forgot code" in capsys.readouterr().out
    merger = STAMerger.from_pretrained(llama_checkpoints.base, {"code": llama_checkpoints.finetuned["code"]})
    merger.compute_importance("code", metric="magnitude")
    expected = merger.forget("code", scaling=0.7, target="code", density=0.25).state_dict()
    assert_same_weights(tmp_path / "forgot", expected)
    # A forget recipe is not a merge recipe.
    capsys.readouterr()
    assert main(["merge", str(config)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"hf-sta: error: forget: '{config}' is a forget recipe; run `hf-sta forget {config}`"
    )


def test_dry_run_writes_nothing(tmp_path, llama_checkpoints, capsys):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    merger.compute_importance("code", metric="magnitude")
    merger.save_importance("code", tmp_path / "code.safetensors")
    out = tmp_path / "merged"
    recipe = llama_recipe(llama_checkpoints, out, method="sta", density=0.5)
    recipe["importance"] = {
        "code": {"path": str(tmp_path / "code.safetensors")},
        "math": {
            "data": str(write_tokenized_jsonl(tmp_path / "m.jsonl", rows=2, length=4, vocab=96, seed=0, labels="lm"))
        },
        "chat": {"metric": "magnitude"},
    }
    recipe["push_to_hub"] = "local-user/never-pushed"
    config = write_recipe(tmp_path / "recipe.yaml", recipe)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["merge", str(config), "--dry-run"]) == 0
    output = capsys.readouterr().out
    assert "Dry run" in output and "tasks: code, math, chat" in output and "sta (density=0.5" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # A dry run still checks the inputs: a missing data file, a wrong importance file.
    recipe["importance"]["math"]["data"] = str(tmp_path / "missing.jsonl")
    assert main(["merge", str(write_recipe(config, recipe)), "--dry-run"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    recipe["importance"]["math"] = {"path": str(tmp_path / "code.safetensors")}  # computed on another model
    assert main(["merge", str(write_recipe(config, recipe)), "--dry-run"]) == 2
    assert "another model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"merge": {"method": "ties", "density": 1.5}}, "merge.density must be in (0, 1], got 1.5"),
        ({"merge": {"method": "ties", "params": {"density": 0}}}, "merge.params.density must be in (0, 1], got 0"),
        ({"merge": {"method": "task_arithmetic", "density": 0.5}}, "merge.density: unknown field; valid fields:"),
        (
            {"merge": {"method": "ties", "params": {"dens": 0.5}}},
            "merge.params.dens: unknown parameter of method 'ties'",
        ),
        ({"merge": {"method": "nope"}}, "merge.method: Unknown merge method 'nope'"),
        ({"merge": {"method": "ties", "scaling": "big"}}, "merge.scaling must be a finite number, got 'big'"),
        ({"merge": {"method": "ties", "torch_dtype": "int8"}}, "merge.torch_dtype: torch_dtype must be one of"),
        ({"merge": {"method": "ties", "tasks": ["code", "poetry"]}}, "merge.tasks[1]: unknown task 'poetry'"),
        ({"merge": {"method": "ties", "weights": [1.0]}}, "merge.weights has 1 value(s) for 3 merged task(s)"),
        ({"merge": {"method": "sta"}}, "importance.code: method 'sta' needs the importance of task 'code'"),
        ({"importance": {"code": {"num_samples": 0}}}, "importance.code.num_samples must be an integer >= 1, got 0"),
        (
            {"importance": {"code": {}}, "merge": {"method": "sta"}},
            "importance.code.data: required for metric 'taylor'",
        ),
        ({"models": {"../evil": "x"}}, "models.../evil: Task name '../evil' is not a safe file name"),
        ({"outputdir": "x"}, "outputdir: unknown field; valid fields: base_model, models"),
        ({"forget": {"task": "code"}}, "merge: a recipe needs exactly one of a merge: or a forget: section"),
        ({"push_to_hub": {"repo_id": "a/b/c"}}, "push_to_hub.repo_id: Repo id must be in the form"),
        ({"base_model": None}, "base_model must be a non-empty string, got None"),
        ({"merge": {"output_format": "adapter"}}, "merge.max_rank: an adapter output needs max_rank or energy"),
        ({"merge": {"output_format": "gguf"}}, "merge.output_format must be one of full, adapter, got 'gguf'"),
        ({"output_format": "adapter", "adapter": {"energy": 2}}, "adapter.energy must be in (0, 1], got 2"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, llama_checkpoints, capsys, change, message):
    recipe = llama_recipe(llama_checkpoints, tmp_path / "out")
    recipe.update(change)
    config = write_recipe(tmp_path / "recipe.yaml", recipe)
    assert main(["merge", str(config)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("hf-sta: error: ") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_bad_files_are_one_line_and_exit_2(tmp_path, llama_checkpoints, capsys):
    assert main(["merge", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == f"hf-sta: error: Recipe '{tmp_path / 'missing.yaml'}' does not exist.\n"
    (tmp_path / "bad.yaml").write_text("merge: [unclosed\n")
    assert main(["merge", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-sta: error: ") and "is not valid YAML" in err and err.count("\n") == 1
    recipe = llama_recipe(llama_checkpoints, tmp_path / "out")
    recipe["models"]["code"] = str(tmp_path / "no-such-model")
    assert main(["merge", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "no-such-model" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    recipe = llama_recipe(llama_checkpoints, tmp_path / "out")
    assert main(["merge", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    output = capsys.readouterr().out
    for name in list_merge_methods():
        spec = get_merge_method(name)
        assert f"  {name}: {spec.pretty_name}" in output
        for parameter in spec.parameters:
            assert f"{parameter.name} ({parameter.type.__name__}; default {parameter.shown_default}" in output
    assert "density (float; default 0.2 (merging), 0.2 (forgetting), unless threshold is set;" in output
    assert "sta: Selective Task Arithmetic [needs importance]" in output and "default scaling: 2" in output
    assert "default None" not in output  # every default reads as a value


def test_help_documents_options_and_defaults(capsys):
    assert main(["merge", "--help"]) == 0
    output = capsys.readouterr().out
    assert "--dry-run" in output and "--output-dir" in output and "(default: False)" in output
    assert "majority_sign_method (str; default total" in output  # method parameters from the registry
    assert main(["importance", "--help"]) == 0
    output = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
    for option, default in (("--num-samples", "256"), ("--micro-batch-size", "8"), ("--metric", "taylor")):
        assert re.search(rf"{option} [^ ]+ .*?\(default: {default}\)", output)
    assert main(["merge"]) == 2  # a usage error is one line too
    assert capsys.readouterr().err == (
        "hf-sta: error: the following arguments are required: config (see `hf-sta merge --help`)\n"
    )


def test_inspect(tmp_path, bert_checkpoints, capsys):
    merger = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    merger.compute_importance("news", metric="magnitude")
    out = merger.merge(method="task_arithmetic", scaling=0.5, output_dir=tmp_path / "merged")
    merger.save_importance("news", out / "importance" / "news.safetensors")
    assert main(["inspect", str(out)]) == 0
    output = capsys.readouterr().out
    assert "Recipe (hf_sta_config.yaml):" in output and "method: task_arithmetic" in output
    lines: dict[str, list[str]] = {}
    for line in output.splitlines():
        if line.startswith("  ") and line.split():
            lines.setdefault(line.split()[0], line.split())  # the tensor table comes first
    assert lines["encoder.layer.0"][1:] == [
        "16",
        f"{sum(v.numel() for k, v in load_state_dict(out).items() if k.startswith('encoder.layer.0.')):,}",
        "float32",
    ]
    assert lines["total"][1] == str(len(load_state_dict(out)))
    assert (
        "Task heads (heads/):" in output
        and "news       2        66          classifier.bias, classifier.weight" in output
    )
    assert "Importance of 'news'" in output and "metric magnitude" in output
    assert main(["inspect", str(tmp_path / "nothing")]) == 2


def test_push_uploads_a_saved_folder(tmp_path, local_hub, llama_checkpoints, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(write_recipe(tmp_path / "r.yaml", llama_recipe(llama_checkpoints, out)))]) == 0
    capsys.readouterr()
    assert main(["push", str(out), "local-user/cli-merge", "--private", "--commit-message", "merge by cli"]) == 0
    assert "cli-merge" in capsys.readouterr().out
    assert local_hub.is_lfs("local-user/cli-merge", "model.safetensors")
    folder = Path(snapshot_download("local-user/cli-merge", cache_dir=tmp_path / "cache"))
    assert {p.name for p in out.iterdir()} <= {p.name for p in folder.iterdir()}
    assert_same_weights(folder, load_state_dict(out))
    # To a new branch, and as a pull request.
    assert main(["push", str(out), "local-user/cli-merge", "--revision", "v2"]) == 0
    assert "model.safetensors" in local_hub.repos["local-user/cli-merge"]["v2"]
    (out / "NOTES.md").write_text("a change to review")
    capsys.readouterr()
    assert main(["push", str(out), "local-user/cli-merge", "--create-pr"]) == 0
    assert "/discussions/" in capsys.readouterr().out or "refs/pr/1" in local_hub.repos["local-user/cli-merge"]
    assert "NOTES.md" not in local_hub.repos["local-user/cli-merge"]["main"]
    assert main(["push", str(tmp_path / "missing"), "local-user/x"]) == 2


def test_merge_recipe_pushes_to_the_hub(tmp_path, local_hub, llama_checkpoints, capsys):
    recipe = llama_recipe(llama_checkpoints, tmp_path / "merged")
    del recipe["output_dir"]  # only pushed: built in a temporary folder
    recipe["push_to_hub"] = {"repo_id": "local-user/recipe-push", "commit_message": "from a recipe"}
    assert main(["merge", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    assert "Pushed to" in capsys.readouterr().out
    assert local_hub.is_lfs("local-user/recipe-push", "model.safetensors")
    assert "hf_sta_config.yaml" in local_hub.repos["local-user/recipe-push"]["main"]


def test_importance_command_writes_a_loadable_file(tmp_path, bert_checkpoints, capsys):
    data = write_tokenized_jsonl(tmp_path / "news.jsonl", rows=6, length=8, vocab=99, seed=3, labels="class")
    output = tmp_path / "scores" / "news.safetensors"
    argv = [
        "importance",
        "--base",
        str(bert_checkpoints.base),
        "--model",
        f"news={bert_checkpoints.finetuned['news']}",
    ]
    argv += ["--data", str(data), "--num-samples", "4", "--micro-batch-size", "2", "--output", str(output)]
    assert main(argv) == 0
    assert "(4 samples)" in capsys.readouterr().out
    merger = STAMerger.from_pretrained(bert_checkpoints.base, {"news": bert_checkpoints.finetuned["news"]})
    loaded = merger.load_importance("news", output)
    assert (loaded.metric, loaded.num_samples) == ("taylor", 4)
    # The same scores as the Python API on the same data.
    dataset = load_calibration_data(
        Recipe.from_dict(
            {"base_model": "b", "models": {"news": "x"}, "merge": {}, "importance": {"news": {"data": str(data)}}}
        ).importance["news"]
    )
    expected = merger.compute_importance("news", dataset, num_samples=4, micro_batch_size=2, show_progress=False)
    reloaded = ImportanceScores.load(output)
    for key in expected.keys():
        torch.testing.assert_close(reloaded[key], expected[key])
    # Argument errors name the option.
    capsys.readouterr()
    assert main(argv[:5] + ["--output", str(output)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "hf-sta: error: --data: required for metric 'taylor' (a data file or dataset name); or give path: of a saved importance file, or metric: magnitude"
    )
    assert main(["importance", "--base", "b", "--model", "news", "--output", str(output)]) == 2
    assert "--model: expected TASK=PATH" in capsys.readouterr().err
    # A valid call never replaces the existing file silently; --overwrite does.
    before = output.read_bytes()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"hf-sta: error: Output file '{output}' exists; pass --overwrite to replace it."
    )
    assert output.read_bytes() == before
    assert main(argv + ["--overwrite"]) == 0
    assert ImportanceScores.load(output).num_samples == 4


def test_recipe_yaml_round_trip(tmp_path, llama_checkpoints):
    recipe = llama_recipe(llama_checkpoints, tmp_path / "out", method="sta", density=0.3, overlap="mean")
    recipe["importance"] = {"code": {"data": "org/code-data", "split": "train[:64]", "num_samples": 64}}
    recipe["importance"].update({task: {"metric": "magnitude"} for task in ("math", "chat")})
    recipe["push_to_hub"] = "me/merged"
    loaded = Recipe.from_yaml(write_recipe(tmp_path / "r.yaml", recipe))
    assert loaded.merge.params == {"density": 0.3, "overlap": "mean"}  # direct parameters land in params
    assert loaded.push_to_hub.repo_id == "me/merged"
    assert Recipe.from_yaml(write_recipe(tmp_path / "again.yaml", yaml.safe_load(loaded.to_yaml()))) == loaded
    text = loaded.to_yaml(tmp_path / "written.yaml")
    assert Recipe.from_yaml(tmp_path / "written.yaml") == loaded and "density: 0.3" in text


def test_recipe_mixes_finetunes_adapters_and_task_vectors(tmp_path, llama_checkpoints):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from hf_sta import TaskVector

    torch.manual_seed(0)
    lora = get_peft_model(
        LlamaForCausalLM.from_pretrained(llama_checkpoints.base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(tmp_path / "chat-lora")
    TaskVector.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned["math"]).save(
        tmp_path / "math.safetensors"
    )
    recipe = {
        "base_model": str(llama_checkpoints.base),
        "models": {"code": str(llama_checkpoints.finetuned["code"])},
        "adapters": {"chat": str(tmp_path / "chat-lora")},
        "task_vectors": {"math": str(tmp_path / "math.safetensors")},
        "merge": {"method": "task_arithmetic", "scaling": 0.5},
        "output_dir": str(tmp_path / "merged"),
    }
    assert main(["merge", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    # Oracle: PEFT folds the LoRA into the weights; task arithmetic by hand.
    dense = lora.merge_and_unload().state_dict()
    base = load_state_dict(llama_checkpoints.base)
    inputs = [load_state_dict(llama_checkpoints.finetuned[t]) for t in ("code", "math")] + [dense]
    merged = load_state_dict(tmp_path / "merged")
    for key, theta_0 in base.items():
        expected = theta_0 + 0.5 * sum(model[key] - theta_0 for model in inputs)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6, msg=key)
    # The recipe written next to the weights lists each input under its role, so it runs again.
    written = yaml.safe_load((tmp_path / "merged" / "hf_sta_config.yaml").read_text())
    assert (written["adapters"], written["task_vectors"]) == (
        {"chat": "../chat-lora"},
        {"math": "../math.safetensors"},
    )
    again = tmp_path / "again"
    assert main(["merge", str(tmp_path / "merged" / "hf_sta_config.yaml"), "--output-dir", str(again)]) == 0
    assert_same_weights(again, merged)


def test_adapter_outputs_from_yaml(tmp_path, llama_checkpoints):
    recipe = llama_recipe(llama_checkpoints, tmp_path / "lora", method="task_arithmetic", scaling=0.5)
    recipe["merge"].update(output_format="adapter", max_rank=4)
    assert main(["merge", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    merger.merge(scaling=0.5, output_format="adapter", max_rank=4, output_dir=tmp_path / "expected")
    assert_same_weights(tmp_path / "lora", load_state_dict(tmp_path / "expected"))
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    written = Recipe.from_yaml(tmp_path / "lora" / "hf_sta_config.yaml")
    assert (written.output_format, written.merge.output_format, written.merge.max_rank) == ("adapter", "adapter", 4)
    assert main(["merge", str(tmp_path / "lora" / "hf_sta_config.yaml"), "--output-dir", str(tmp_path / "again")]) == 0
    assert_same_weights(tmp_path / "again", load_state_dict(tmp_path / "lora"))

    # Forgetting as a reversible adapter; the top-level output_format / adapter (as the merger writes them) work too.
    forget = {
        "base_model": str(llama_checkpoints.base),
        "models": {"code": str(llama_checkpoints.finetuned["code"])},
        "forget": {"task": "code", "method": "negation", "scaling": 0.5},
        "output_format": "adapter",
        "adapter": {"max_rank": 2},
        "output_dir": str(tmp_path / "forget-lora"),
    }
    assert main(["forget", str(write_recipe(tmp_path / "f.yaml", forget))]) == 0
    merger = STAMerger.from_pretrained(llama_checkpoints.base, {"code": llama_checkpoints.finetuned["code"]})
    merger.forget(
        "code", method="negation", scaling=0.5, as_adapter=True, max_rank=2, output_dir=tmp_path / "f-expected"
    )
    assert_same_weights(tmp_path / "forget-lora", load_state_dict(tmp_path / "f-expected"))
    loaded = Recipe.from_yaml(tmp_path / "f.yaml")
    assert (loaded.forget.as_adapter, loaded.forget.max_rank) == (True, 2)
    assert Recipe.from_dict(loaded.to_dict()) == loaded


def test_saved_sta_recipe_reruns_from_another_directory(tmp_path, llama_checkpoints, monkeypatch):
    """The recipe next to an STA merge records absolute inputs and the importance it used: it reproduces the merge."""
    from hf_sta import STAMerger
    from hf_sta.cli import main
    from tests.conftest import load_state_dict

    monkeypatch.chdir(tmp_path)
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    for task in merger.tasks:
        merger.compute_importance(task, metric="magnitude")
    first = merger.merge(method="sta", density=0.3, output_dir="first")
    assert sorted(p.name for p in (first / "importance").iterdir()) == sorted(f"{t}.safetensors" for t in merger.tasks)
    (first / "README.md").write_text((first / "README.md").read_text() + "\nMy own notes.\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge", str(tmp_path / "first" / "hf_sta_config.yaml"), "--output-dir", "second"]) == 0
    again = load_state_dict(elsewhere / "second")
    for key, value in load_state_dict(tmp_path / "first").items():
        assert torch.equal(again[key], value), key
    monkeypatch.chdir(tmp_path)
    merger.merge(method="sta", density=0.3, output_dir="first", overwrite=True)
    assert "My own notes." in (first / "README.md").read_text()
