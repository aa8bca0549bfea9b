"""STAMergeCallback with a real transformers.Trainer: the merged output equals task arithmetic on the trained model."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from hf_sta import ConfigError, MergeConfig, STAMerger
from hf_sta.callback import STAMergeCallback
from hf_sta.importance import ImportanceScores
from tests.conftest import load_state_dict


def training_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "trainer"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def lm_dataset(rows: int = 8, length: int = 8, vocab: int = 96, seed: int = 0) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, length), generator=generator)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def classification_dataset(rows: int = 8, length: int = 8, vocab: int = 99, seed: int = 0) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, length), generator=generator)
    labels = torch.randint(0, 2, (rows,), generator=generator)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def trained_llama(checkpoints):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(checkpoints.base)


def test_full_finetune_merged_with_other_finetunes(tmp_path, llama_checkpoints):
    model = trained_llama(llama_checkpoints)
    others = {task: llama_checkpoints.finetuned[task] for task in ("code", "math")}
    callback = STAMergeCallback(
        llama_checkpoints.base,
        task_name="support",
        models=others,
        merge_config=MergeConfig(method="task_arithmetic", scaling=0.5),
        output_dir=tmp_path / "merged",
    )
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=lm_dataset(), callbacks=[callback])
    trainer.train()
    assert callback.output_path == tmp_path / "merged"

    # Oracle: task arithmetic by hand on the trained weights and the other fine-tunes.
    base = load_state_dict(llama_checkpoints.base)
    trained = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    finetuned = [load_state_dict(folder) for folder in others.values()]
    merged = load_state_dict(callback.output_path)
    assert set(merged) == set(base)
    changed = 0
    for key, theta_0 in base.items():
        delta = (trained[key] - theta_0) + sum(ft[key] - theta_0 for ft in finetuned)
        torch.testing.assert_close(merged[key], theta_0 + 0.5 * delta, rtol=0, atol=1e-6, msg=key)
        changed += int(not torch.equal(trained[key], theta_0))
    assert changed > 0  # the training moved the weights
    recipe = (callback.output_path / "hf_sta_config.yaml").read_text()
    assert "support: <trained model, not saved>" in recipe


def test_peft_lora_model_is_merged_as_its_dense_delta(tmp_path, bert_checkpoints):
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification, BertModel

    from tests.conftest import tiny_bert_config

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    model.bert.load_state_dict(BertModel.from_pretrained(bert_checkpoints.base).state_dict())
    peft_model = get_peft_model(
        model,
        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False),
    )
    others = {task: bert_checkpoints.finetuned[task] for task in ("news", "sentiment")}
    callback = STAMergeCallback(
        bert_checkpoints.base, task_name="reviews", models=others, output_dir=tmp_path / "merged"
    )
    trainer = Trainer(
        model=peft_model,
        args=training_args(tmp_path),
        train_dataset=classification_dataset(),
        data_collator=default_data_collator,
        callbacks=[callback],
    )
    trainer.train()
    assert type(trainer.model).__name__.startswith("Peft")  # the Trainer's model is left as it was

    # Oracle: the LoRA folded into the weights by PEFT, then task arithmetic (scaling 1) in base names.
    dense = copy.deepcopy(trainer.model).merge_and_unload().state_dict()
    base = load_state_dict(bert_checkpoints.base)
    finetuned = [load_state_dict(folder) for folder in others.values()]
    merged = load_state_dict(callback.output_path)
    lora_targets = 0
    for key, theta_0 in base.items():
        delta = (dense[f"bert.{key}"] - theta_0) + sum(ft[f"bert.{key}"] - theta_0 for ft in finetuned)
        torch.testing.assert_close(merged[key], theta_0 + delta, rtol=0, atol=1e-6, msg=key)
        lora_targets += int(".query.weight" in key or ".value.weight" in key)
    assert lora_targets == 4
    heads = load_state_dict(callback.output_path / "heads")
    assert set(heads) >= {"classifier.weight", "classifier.bias"}
    from safetensors.torch import load_file

    head = load_file(callback.output_path / "heads" / "reviews.safetensors")
    torch.testing.assert_close(head["classifier.weight"], dense["classifier.weight"], rtol=0, atol=0)


def test_sta_with_importance_from_a_slice_of_the_train_data(tmp_path, llama_checkpoints):
    code = STAMerger.from_pretrained(llama_checkpoints.base, {"code": llama_checkpoints.finetuned["code"]})
    code.compute_importance("code", metric="magnitude")
    code.save_importance("code", tmp_path / "code.safetensors")
    train = lm_dataset(rows=10, seed=1)
    callback = STAMergeCallback(
        llama_checkpoints.base,
        task_name="support",
        models={"code": llama_checkpoints.finetuned["code"]},
        merge_config={"method": "sta", "density": 0.5},
        importance_files={"code": tmp_path / "code.safetensors"},
        importance_samples=4,
        importance_micro_batch_size=2,
        output_dir=tmp_path / "merged",
        trained_model_dir=tmp_path / "trained",
    )
    trainer = Trainer(
        model=trained_llama(llama_checkpoints), args=training_args(tmp_path), train_dataset=train, callbacks=[callback]
    )
    trainer.train()

    saved = ImportanceScores.load(callback.output_path / "importance" / "support.safetensors")
    assert (saved.metric, saved.num_samples, saved.micro_batches) == ("taylor", 4, 2)
    # Oracle: the same importance from the first 4 train samples, computed afresh on the saved trained checkpoint,
    # and the same STA merge.
    oracle = STAMerger.from_pretrained(
        llama_checkpoints.base, {"code": llama_checkpoints.finetuned["code"], "support": tmp_path / "trained"}
    )
    oracle.load_importance("code", tmp_path / "code.safetensors")
    loader = torch.utils.data.DataLoader(train.select(range(4)), batch_size=2, collate_fn=default_data_collator)
    expected = oracle.compute_importance("support", loader, show_progress=False)
    for key in expected.keys():
        torch.testing.assert_close(saved[key], expected[key], rtol=1e-5, atol=1e-8, msg=key)
    merged = oracle.merge(method="sta", density=0.5).state_dict()
    output = load_state_dict(callback.output_path)
    for key, value in merged.items():
        torch.testing.assert_close(output[key], value, rtol=0, atol=1e-6, msg=key)


def test_pushes_the_merge(tmp_path, local_hub, llama_checkpoints):
    callback = STAMergeCallback(
        llama_checkpoints.base,
        models={"code": llama_checkpoints.finetuned["code"]},
        output_dir=tmp_path / "merged",
        push_to_hub={"repo_id": "local-user/after-training", "private": True},
    )
    trainer = Trainer(
        model=trained_llama(llama_checkpoints),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=lm_dataset(),
        callbacks=[callback],
    )
    trainer.train()
    assert callback.commit is not None
    assert local_hub.is_lfs("local-user/after-training", "model.safetensors")


def test_bad_settings_fail_before_training(tmp_path, llama_checkpoints):
    code = {"code": llama_checkpoints.finetuned["code"]}
    base = llama_checkpoints.base
    with pytest.raises(ConfigError, match="merge_config.density must be in"):
        STAMergeCallback(base, models=code, merge_config={"method": "ties", "density": 2}, output_dir=tmp_path)
    with pytest.raises(ConfigError, match="importance_files: method 'sta' needs the importance of code"):
        STAMergeCallback(base, models=code, merge_config={"method": "sta"}, output_dir=tmp_path, importance_samples=4)
    with pytest.raises(ConfigError, match="importance_samples"):
        STAMergeCallback(
            base, models=code, merge_config={"method": "sta"}, importance_files={"code": "c"}, output_dir=tmp_path
        )
    with pytest.raises(ConfigError, match="task_name"):
        STAMergeCallback(base, task_name="code", models=code, output_dir=tmp_path)
    with pytest.raises(ConfigError, match="models"):
        STAMergeCallback(base, output_dir=tmp_path)


def test_merged_model_folder_supplies_the_other_inputs(tmp_path, llama_checkpoints):
    previous = STAMerger.from_pretrained(
        llama_checkpoints.base, {t: llama_checkpoints.finetuned[t] for t in ("code", "math")}
    )
    previous.merge(method="ties", density=0.5, output_dir=tmp_path / "previous")
    callback = STAMergeCallback(
        llama_checkpoints.base, merged_model=tmp_path / "previous", output_dir=tmp_path / "merged"
    )
    assert callback.models == {t: str(llama_checkpoints.finetuned[t]) for t in ("code", "math")}
    assert (callback.merge_config.method, callback.merge_config.params["density"]) == ("ties", 0.5)
    model = trained_llama(llama_checkpoints)
    output = callback.merge_trained_model(model)
    expected = STAMerger.from_pretrained(
        llama_checkpoints.base, {**{t: llama_checkpoints.finetuned[t] for t in ("code", "math")}, "trained": model}
    ).merge(method="ties", density=0.5)
    saved = load_state_dict(output)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=1e-6, msg=key)
