"""SAM / ASAM: the optimizer against closed forms, SAMTrainer against batch equivalences and a hand-written loop."""

from __future__ import annotations

import copy
from pathlib import Path

import datasets
import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_sta import MergeConfig
from hf_sta.callback import STAMergeCallback
from hf_sta.training import SAM, FinetuneConfig, SAMTrainer, finetune, make_optimizer, perturb, sam_perturbation
from tests.conftest import load_state_dict, run_processes, tiny_bert_config

ROOT = Path(__file__).resolve().parents[1]


# -- the optimizer ----------------------------------------------------------------------------------------------------
def test_one_sam_sgd_step_on_a_quadratic_is_the_closed_form():
    """f = 1/2 theta^T A theta, g = A theta: theta' = theta - lr * A (theta + rho g / ||g||)."""
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    a = m @ m.T + torch.eye(5, dtype=torch.float64)
    theta0 = torch.randn(5, generator=generator, dtype=torch.float64)
    theta = torch.nn.Parameter(theta0.clone())
    lr, rho = 0.1, 0.3
    optimizer = SAM([theta], torch.optim.SGD, rho=rho, lr=lr)

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * theta @ a @ theta
        loss.backward()
        return loss

    closure()
    optimizer.step(closure)
    g = a @ theta0
    expected = theta0 - lr * a @ (theta0 + rho * g / g.norm())
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-12, atol=1e-12)

    # without a gradient in .grad, step(closure) computes it first: same closed form from the new point
    optimizer.zero_grad()
    start = theta.detach().clone()
    optimizer.step(closure)
    g = a @ start
    torch.testing.assert_close(theta.detach(), start - lr * a @ (start + rho * g / g.norm()), rtol=1e-12, atol=1e-12)


def test_asam_perturbation_is_its_formula_over_all_groups():
    """e = rho * T^2 g / ||T g||, T = |theta| + eta, one global norm over every group."""
    generator = torch.Generator().manual_seed(1)
    params = [
        torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64))
        for shape in [(3, 4), (4,), (2,)]
    ]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator, dtype=torch.float64)
    rho, eta = 0.5, 0.01
    optimizer = SAM(
        [{"params": params[:2]}, {"params": params[2:]}], torch.optim.SGD, rho=rho, adaptive=True, eta=eta, lr=0.0
    )
    t = [p.detach().abs() + eta for p in params]
    norm = torch.cat([(ti * p.grad).flatten() for ti, p in zip(t, params)]).norm()
    expected = [rho * ti**2 * p.grad / norm for ti, p in zip(t, params)]
    before = [p.detach().clone() for p in params]
    optimizer.first_step()
    for param, start, e in zip(params, before, expected):
        torch.testing.assert_close(param.detach() - start, e, rtol=1e-10, atol=1e-12)
    optimizer.second_step()  # lr 0: back to theta exactly
    for param, start in zip(params, before):
        assert torch.equal(param.detach(), start)
    # the perturbation has length rho in T's metric: ||T^-1 e|| = rho
    e = sam_perturbation(optimizer.param_groups, rho=rho)
    scaled = torch.cat([(e[p] / ti).flatten() for ti, p in zip(t, params)])
    torch.testing.assert_close(scaled.norm(), torch.tensor(rho, dtype=torch.float64))


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _data(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def test_rho_zero_is_the_base_optimizer_bit_for_bit():
    x, y = _data()
    plain, sharp = _mlp(), _mlp()
    base = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    sam = SAM(sharp.parameters(), torch.optim.AdamW, rho=0.0, lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        base.zero_grad()
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        base.step()

        def closure():
            sam.zero_grad()
            loss = torch.nn.functional.cross_entropy(sharp(x), y)
            loss.backward()
            return loss

        closure()
        sam.step(closure)
    for a, b in zip(plain.parameters(), sharp.parameters()):
        assert torch.equal(a, b)


def test_frozen_parameters_are_never_perturbed_or_moved():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    model[0].weight.grad = torch.ones_like(model[0].weight)  # a stray gradient on a frozen tensor: still skipped
    frozen = model[0].weight.detach().clone()
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = _data()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.first_step()
    assert torch.equal(model[0].weight, frozen)
    assert model[0].weight not in optimizer._saved and len(optimizer._saved) == 3
    model[0].weight.grad = None  # (a base optimizer would apply a stray gradient: that is not SAM's to filter)
    optimizer.second_step()
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight, _mlp()[2].weight)  # the trainable ones moved


def test_state_dict_round_trip_and_scheduler_on_the_wrapper():
    x, y = _data()

    def run(model, optimizer, steps):
        for _ in range(steps):

            def closure():
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            closure()  # the gradient at theta (a stale one from the last step would be used as it)
            optimizer.step(closure)

    model = _mlp()
    optimizer = SAM(model.parameters(), torch.optim.Adam, rho=0.1, adaptive=True, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    run(model, optimizer, 2)
    scheduler.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)  # the scheduler drives the base
    state = copy.deepcopy(optimizer.state_dict())
    assert state["param_groups"][0]["rho"] == 0.1 and state["param_groups"][0]["adaptive"] is True

    twin = copy.deepcopy(model)
    restored = SAM(twin.parameters(), torch.optim.Adam, rho=0.9, lr=1.0)
    restored.load_state_dict(state)
    assert restored.param_groups is restored.base_optimizer.param_groups
    assert restored.param_groups[0]["rho"] == 0.1 and restored.param_groups[0]["lr"] == pytest.approx(5e-3)
    run(model, optimizer, 2)
    run(twin, restored, 2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rho"):
        SAM(_mlp().parameters(), torch.optim.SGD, rho=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        SAM(_mlp().parameters(), torch.optim.SGD, lr=0.1).step()
    with pytest.raises(ValueError, match="optimizer must be one of"):
        FinetuneConfig(optimizer="lion")


# -- SAMTrainer -------------------------------------------------------------------------------------------------------
def _tiny_classifier(seed: int = 0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(config)


def _classification_rows(rows: int = 8, length: int = 8, seed: int = 0) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (rows, length), generator=generator)
    labels = torch.randint(0, 2, (rows,), generator=generator)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def _args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "trainer"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        optim="sgd",  # Adam's first steps are sign-like: they would amplify summation-order noise into the comparison
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _trained(tmp_path, trainer_class=SAMTrainer, data=None, **kwargs):
    sam = {k: kwargs.pop(k) for k in ("sam_rho", "sam_adaptive") if k in kwargs}
    model = _tiny_classifier()
    extra = sam if trainer_class is SAMTrainer else {}
    trainer = trainer_class(
        model=model, args=_args(tmp_path, **kwargs), train_dataset=data or _classification_rows(4), **extra
    )
    # transformers 5.24 treats BertForSequenceClassification as normalising its loss by `num_items_in_batch` (its
    # forward takes **kwargs) but the classification loss is a per-micro-batch mean: without this, the plain Trainer's
    # accumulated gradient is gradient_accumulation_steps x the big batch's.
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}, trainer


def _by_hand(steps: int, rho: float, adaptive: bool, lr: float = 0.1):
    """The oracle: SAM(SGD) on the whole 4-row batch, constant lr, no clipping (what the Trainer was set to do)."""
    model = _tiny_classifier()
    batch = _classification_rows(4).with_format("torch")[:]
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr)
    model.train()
    for _ in range(steps):

        def closure():
            optimizer.zero_grad()
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            loss.backward()
            return loss

        closure()
        optimizer.step(closure)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 0.5)])
def test_sam_trainer_equals_sam_by_hand_and_grad_accumulation_equals_the_big_batch(tmp_path, adaptive, rho):
    expected = _by_hand(3, rho, adaptive)
    big, trainer = _trained(tmp_path / "big", sam_rho=rho, sam_adaptive=adaptive)
    accumulated, _ = _trained(
        tmp_path / "ga",
        sam_rho=rho,
        sam_adaptive=adaptive,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    plain, _ = _trained(tmp_path / "plain", trainer_class=Trainer)
    assert trainer.sam_seconds > 0
    moved = 0
    for key in expected:
        torch.testing.assert_close(big[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
        torch.testing.assert_close(accumulated[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
        moved += int((plain[key] - expected[key]).abs().max() > 1e-4)
    assert moved > 0  # SAM's update is not AdamW's: the comparison could fail


def test_sam_trainer_frozen_parameters_and_bf16(tmp_path):
    model = _tiny_classifier()
    for param in model.bert.embeddings.parameters():
        param.requires_grad_(False)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = _args(tmp_path, bf16=True, max_grad_norm=1.0, lr_scheduler_type="linear")
    trainer = SAMTrainer(model=model, args=args, train_dataset=_classification_rows(8), sam_rho=0.05)
    trainer.train()
    fp32, _ = _trained(tmp_path / "fp32", data=_classification_rows(8), max_grad_norm=1.0, lr_scheduler_type="linear")
    for key, param in model.named_parameters():
        if key.startswith("bert.embeddings"):
            assert torch.equal(param, before[key]), key
        else:
            assert torch.isfinite(param).all(), key
    moved = [
        k for k in before if not k.startswith("bert.embeddings") and not torch.equal(before[k], model.get_parameter(k))
    ]
    assert len(moved) > 10
    # bf16 autocast follows the fp32 run to bf16 precision (not a different optimizer)
    delta_bf16 = torch.cat([(model.get_parameter(k) - before[k]).flatten() for k in moved])
    delta_fp32 = torch.cat([(fp32[k] - before[k]).flatten() for k in moved])
    assert torch.nn.functional.cosine_similarity(delta_bf16, delta_fp32, dim=0) > 0.9


def test_sam_finetune_then_merge_in_one_train_call(tmp_path, llama_checkpoints):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(llama_checkpoints.base)
    others = {task: llama_checkpoints.finetuned[task] for task in ("code", "math")}
    callback = STAMergeCallback(
        llama_checkpoints.base,
        task_name="support",
        models=others,
        merge_config=MergeConfig(method="task_arithmetic", scaling=0.5),
        output_dir=tmp_path / "merged",
    )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 96, (8, 8), generator=generator).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    trainer = SAMTrainer(
        model=model,
        args=_args(tmp_path, max_steps=2, per_device_train_batch_size=2),
        train_dataset=data,
        callbacks=[callback],
        sam_rho=0.05,
    )
    trainer.train()
    base = load_state_dict(llama_checkpoints.base)
    trained = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    finetuned = [load_state_dict(folder) for folder in others.values()]
    merged = load_state_dict(callback.output_path)
    changed = 0
    for key, theta_0 in base.items():
        delta = (trained[key] - theta_0) + sum(ft[key] - theta_0 for ft in finetuned)
        torch.testing.assert_close(merged[key], theta_0 + 0.5 * delta, rtol=0, atol=1e-6, msg=key)
        changed += int(not torch.equal(trained[key], theta_0))
    assert changed > 0


@pytest.mark.slow
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    """2 gloo CPU processes (torchrun, as `accelerate launch --multi_gpu` would start them) with 2 rows each equal one
    process with the 4 rows: DDP all-reduces the gradient at theta (so e is global) and at theta + e.

    (`accelerate launch --num_processes 2 --cpu` starts a single process: `--cpu` wins, WORLD_SIZE is never set.)
    """
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"params-{processes}.safetensors"
        result = run_processes(processes, ROOT / "tests" / "scripts" / "sam_distributed.py", out, 4 // processes)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[processes] = _load(out)
    start = _tiny_classifier().state_dict()
    expected = _by_hand(3, 0.05, adaptive=False)
    for key, value in outputs[1].items():
        torch.testing.assert_close(outputs[2][key], value, rtol=1e-5, atol=1e-7, msg=key)
        if key in expected:
            torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-6, msg=key)
    assert any(not torch.equal(outputs[1][k], start[k]) for k in outputs[1])


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


# -- the shared fine-tuning loop --------------------------------------------------------------------------------------
def _text_rows(n: int = 10):
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    return [{"text": " ".join(words[(i + j) % 6] for j in range(1 + i % 4)), "label": i % 2} for i in range(n)]


class _CharTokenizer:
    """Enough of a tokenizer for the loop: ids = byte values % 99, right padding, attention mask."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = [[1 + b % 98 for b in t.encode()][:max_length] for t in texts]
        width = max(map(len, ids))
        return {
            "input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids]),
        }


def test_finetune_loop_adamw_is_the_benchmark_loop_bit_for_bit():
    """Oracle: the loop benchmarks/finetune.py ran before the shared loop existed (copied here, version 1)."""
    from transformers import BertForSequenceClassification, get_linear_schedule_with_warmup

    from hf_sta.training import text_classification_collator

    rows, tokenizer = _text_rows(), _CharTokenizer()
    texts, labels = [r["text"] for r in rows], torch.tensor([r["label"] for r in rows])
    torch.manual_seed(3)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3
    )
    batch_size, epochs = 4, 2
    steps_per_epoch = -(-len(texts) // batch_size)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(0.1 * epochs * steps_per_epoch), epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(texts), generator=generator).tolist()
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            inputs = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            model(**inputs, labels=labels[idx]).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    torch.manual_seed(3)
    shared = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    collate = text_classification_collator(tokenizer, max_length=128)
    result = finetune(shared, rows, collate, learning_rate=1e-3, batch_size=4, seed=3, show_progress=False)
    assert result.steps == epochs * steps_per_epoch
    for (name, a), b in zip(model.named_parameters(), shared.parameters()):
        assert torch.equal(a, b), name


def test_finetune_loop_sam_equals_first_and_second_step_by_hand():
    from transformers import BertForSequenceClassification

    from hf_sta.training import text_classification_collator

    rows, tokenizer = _text_rows(8), _CharTokenizer()
    collate = text_classification_collator(tokenizer)
    config = FinetuneConfig(
        optimizer="asam", epochs=1, batch_size=8, warmup_ratio=0.0, learning_rate=1e-3, max_grad_norm=None
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        tiny_bert_config(num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    )
    twin = copy.deepcopy(model)
    finetune(model, rows, collate, config, show_progress=False)
    # by hand: one ASAM step at rho 0.5 (DEFAULT_RHO), lr 1e-3 (the linear schedule's first step has factor 1)
    optimizer = make_optimizer(twin, config)
    assert isinstance(optimizer, SAM) and optimizer.param_groups[0]["rho"] == 0.5
    batch = collate([rows[i] for i in torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()])
    twin(**batch).loss.backward()
    optimizer.first_step(zero_grad=True)
    twin(**batch).loss.backward()
    optimizer.second_step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_sam_trainer_on_a_peft_model_perturbs_and_moves_only_the_adapter(tmp_path, llama_checkpoints, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from hf_sta.training import trainer as trainer_module

    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(llama_checkpoints.base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False),
    )
    names = {id(p): n for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturbed: set[str] = set()

    def recording_perturb(param_groups, **kwargs):
        saved = perturb(param_groups, **kwargs)
        perturbed.update(names[id(p)] for p in saved)
        return saved

    monkeypatch.setattr(trainer_module, "perturb", recording_perturb)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 96, (8, 8), generator=generator).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2)
    SAMTrainer(model=model, args=args, train_dataset=data, sam_rho=0.5, sam_adaptive=True).train()
    adapter = {n for n in before if "lora_" in n}
    assert adapter and perturbed == adapter  # every adapter tensor, nothing else
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (name in adapter), name  # the base never moves; the adapter does
