"""QAT components: fake quantization equals the integer quantizer, STE gradients, the schedule, convert."""

from __future__ import annotations

import pytest
import torch

from bittune.config import config_from_dict
from bittune.errors import ConfigError
from bittune.quant.intq import quantize_dequantize
from bittune.quant.qat import (
    BitSchedule,
    FakeQuant,
    attach_fake_quant,
    convert,
    quantize_linears_,
    remove_fake_quant,
)
from bittune.quant.select import quantizable_linears

IDS = torch.tensor([[1, 5, 9, 20, 33, 4, 17, 60], [2, 8, 40, 41, 3, 7, 11, 90]])


def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def with_lora(model, seed: int = 0):
    """LoRA on every linear, with B randomised so the adapter's delta is not zero (else tests could not fail)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return peft_model.eval()


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_weight_equals_real_quantize_dequantize(tiny_llama_dir, bits, symmetric):
    model = tiny_llama(tiny_llama_dir)
    originals = {name: lin.weight.detach().clone() for name, lin in quantizable_linears(model)}
    handle = attach_fake_quant(model, bits=8, group_size=16, symmetric=symmetric)
    handle.set_bits(bits)
    assert handle.bits == bits and sorted(handle.names) == sorted(originals)
    for name, w in originals.items():
        linear = model.get_submodule(name)
        assert torch.equal(linear.weight, quantize_dequantize(w, bits, 16, symmetric)), name
        assert torch.equal(linear.parametrizations.weight.original, w)  # the latent weight is untouched
    # Heads stay in float: the (tied) lm_head is not fake-quantized.
    assert not hasattr(model.lm_head, "parametrizations")


def test_ste_gradient_is_the_gradient_at_the_quantized_weight():
    torch.manual_seed(0)
    x = torch.randn(5, 32)
    fq_linear = torch.nn.Linear(32, 8)
    ref = torch.nn.Linear(32, 8)
    with torch.no_grad():
        ref.weight.copy_(quantize_dequantize(fq_linear.weight, 3, 16))
        ref.bias.copy_(fq_linear.bias)
    torch.nn.utils.parametrize.register_parametrization(fq_linear, "weight", FakeQuant(3, 16, False))
    upstream = torch.randn(5, 8)
    fq_linear(x).backward(upstream)
    ref(x).backward(upstream)
    grad = fq_linear.parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0
    # Straight-through: the latent weight receives exactly the gradient taken at the quantized weight.
    assert torch.equal(grad, ref.weight.grad)


def test_gradients_flow_through_a_fake_quantized_model(tiny_llama_dir):
    model = tiny_llama(tiny_llama_dir).train()
    attach_fake_quant(model, bits=4, group_size=16, symmetric=False)
    model(input_ids=IDS, labels=IDS).loss.backward()
    for name, linear in quantizable_linears(model):
        g = linear.parametrizations.weight.original.grad
        assert g is not None and g.abs().sum() > 0, name


def test_lora_gradients_flow_and_the_base_stays_frozen(tiny_llama_dir):
    model = with_lora(tiny_llama(tiny_llama_dir)).train()
    attach_fake_quant(model, bits=4, group_size=16, symmetric=False)
    model(input_ids=IDS, labels=IDS).loss.backward()
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora)
    assert all(p.grad is None for n, p in model.named_parameters() if "original" in n)


def test_full_qat_convert_output_equals_fake_quantized_output(tiny_llama_dir):
    model = tiny_llama(tiny_llama_dir)
    handle = attach_fake_quant(model, bits=8, group_size=16, symmetric=False)
    handle.set_bits(3)
    with torch.no_grad():
        fake = model(input_ids=IDS).logits
    converted = convert(model, bits=3, group_size=16, symmetric=False)
    assert not any(hasattr(m, "parametrizations") for m in converted.modules())
    with torch.no_grad():
        real = converted(input_ids=IDS).logits
    assert torch.equal(fake, real)
    with torch.no_grad():  # and the quantization is not a no-op, so the comparison above means something
        assert not torch.allclose(tiny_llama(tiny_llama_dir)(input_ids=IDS).logits, real, atol=1e-3)


def test_lora_qat_convert_folds_the_adapter_before_quantizing(tiny_llama_dir):
    model = with_lora(tiny_llama(tiny_llama_dir))
    attach_fake_quant(model, bits=3, group_size=16, symmetric=False)
    with torch.no_grad():
        fake = model(input_ids=IDS).logits
    converted = convert(model, bits=3, group_size=16, symmetric=False)
    assert not hasattr(converted, "peft_config")
    with torch.no_grad():
        real = converted(input_ids=IDS).logits
    torch.testing.assert_close(real, fake, atol=2e-5, rtol=1e-5)
    # Fake-quantizing the base alone (adapter added on top) is a different model: the fold-then-quantize
    # identity above is what makes the adapter survive convert.
    naive = with_lora(tiny_llama(tiny_llama_dir))
    for _, linear in quantizable_linears(naive):
        torch.nn.utils.parametrize.register_parametrization(linear, "weight", FakeQuant(3, 16, False))
    with torch.no_grad():
        assert not torch.allclose(naive(input_ids=IDS).logits, real, atol=1e-3)


def test_classifier_convert_keeps_the_head_in_float(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    head = model.classifier.weight.detach().clone()
    handle = attach_fake_quant(model, bits=4, group_size=16, symmetric=True)
    assert all("classifier" not in n for n in handle.names) and handle.names
    with torch.no_grad():
        fake = model(input_ids=IDS).logits
    converted = convert(model, bits=4, group_size=16, symmetric=True)
    with torch.no_grad():
        assert torch.equal(converted(input_ids=IDS).logits, fake)
    assert torch.equal(converted.classifier.weight, head)


def test_remove_fake_quant_restores_the_latent_weights(tiny_llama_dir):
    model = tiny_llama(tiny_llama_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attach_fake_quant(model, bits=2, group_size=16, symmetric=False)
    remove_fake_quant(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_quantize_linears_is_plain_ptq(tiny_llama_dir):
    model = tiny_llama(tiny_llama_dir)
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    n = quantize_linears_(model, bits=4, group_size=16, symmetric=False)
    assert n == len(quantizable_linears(model)) == 14
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, quantize_dequantize(w, 4, 16))


# --- schedule -----------------------------------------------------------------------------------------------


def test_schedule_switches_bits_at_stage_ends():
    s = BitSchedule.build([8, 6, 4], [2, 3, 4], total_steps=9)
    assert s.ends == (2, 5, 9)
    # bits_at(step) = bits of the next step after `step` completed ones: steps 1-2 at 8, 3-5 at 6, 6-9 at 4.
    assert [s.bits_at(k) for k in range(9)] == [8, 8, 6, 6, 6, 4, 4, 4, 4]
    assert [s.ends_stage(k) for k in range(1, 10)] == [None, 0, None, None, 1, None, None, None, 2]


def test_schedule_may_increase_and_the_last_stage_runs_on():
    s = BitSchedule.build([3, 8], [2, 2], total_steps=6)  # max_steps beyond the schedule: the last stage continues
    assert s.ends == (2, 6) and [s.bits_at(k) for k in range(6)] == [3, 3, 8, 8, 8, 8]


def test_schedule_without_stage_lengths_splits_the_run_evenly():
    assert BitSchedule.build([8, 6, 4], None, total_steps=10).ends == (4, 7, 10)
    with pytest.raises(ValueError, match="at least 3 steps"):
        BitSchedule.build([8, 6, 4], None, total_steps=2)


# --- config ---------------------------------------------------------------------------------------------------


def raw(**sections) -> dict:
    base = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "output_dir": "out"}
    base.update(sections)
    return base


def test_qat_config_round_trips_through_run_config_yaml():
    import yaml

    from bittune.config import RunConfig, dump_config

    cfg = config_from_dict(raw(method="qat", qat={"schedule": [8, 4], "steps_per_stage": 3},
                               distill={"teacher": "t", "alpha": 0.2}))  # fmt: skip
    assert RunConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg


def test_qat_config_accepts_the_issue_example():
    cfg = config_from_dict(
        raw(method="qat", qat={"schedule": [8, 6, 4], "steps_per_stage": 200, "group_size": 64, "method": "int"})
    )
    assert cfg.qat.explicit_steps() == [200, 200, 200] and not cfg.qat.symmetric
    cfg = config_from_dict(raw(method="lora", qat={"schedule": [4], "stage_steps": [5]}))
    assert cfg.qat.explicit_steps() == [5]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"method": "qat"}, "method: qat needs a qat section"),
        ({"method": "qlora", "qat": {"schedule": [4]}}, "already stored in bitsandbytes"),
        ({"method": "full", "qat": {"schedule": [4]}}, "write method: qat"),
        ({"method": "qat", "qat": {"schedule": []}}, "schedule is empty"),
        ({"method": "qat", "qat": {"schedule": [8, 1, 9]}}, r"must be 2..8, got \[1, 9\]"),
        ({"method": "qat", "qat": {"schedule": [8, 4], "stage_steps": [5]}}, "one step count per stage"),
        ({"method": "qat", "qat": {"schedule": [8], "steps_per_stage": 5, "stage_steps": [5]}}, "not both"),
        ({"method": "qat", "qat": {"schedule": [4], "method": "nf4"}}, "qat.method"),
        ({"method": "qat", "qat": {"schedule": [4], "bits": 4}}, "unknown key"),
        (
            {"method": "qat", "qat": {"schedule": [8, 4], "steps_per_stage": 10}, "train": {"max_steps": 15}},
            "ends the run before the qat schedule",
        ),
        ({"distill": {"teacher": "t", "alpha": 1.5}}, "distill.alpha"),
        ({"distill": {"teacher": "t", "temperature": 0}}, "distill.temperature"),
    ],
)
def test_bad_qat_and_distill_configs_are_refused(sections, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw(**sections))


def test_a_peft_classifier_head_is_not_quantized(tiny_bert_dir):
    """PEFT wraps a fully trained head as classifier.original_module / classifier.modules_to_save.default."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type=TaskType.SEQ_CLS))
    names = [n for n, _ in quantizable_linears(peft_model)]
    assert names and not any("classifier" in n for n in names)
    assert any(n.endswith("layer.0.output.dense.base_layer") for n in names)  # "output" inside the body stays
