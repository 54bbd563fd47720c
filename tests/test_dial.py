"""The compute dial: a budget chosen at inference. The quantile dial calibrated beside an
ordinary D-LLM adapter meets a budget on its calibration records and on held-out ones; more budget
never executes fewer blocks; a batch with mixed budgets routes each row as it would alone; the
budget-conditioned D-LLM trains each sequence at its own drawn target; a budget an adapter cannot
meet is one line; adapters without the option are unchanged."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

import finetuning
from dllm import dial, evaluate, scoring
from dllm.chat import ChatFormat
from dllm.data import load_records
from dllm.checkpoints import adapters, dial_file
from dllm.errors import InputError
from dllm.generation import Llama
from dllm.core.layers import anchor_weights
from dllm.core.model import ModelArgs, Transformer, is_adapter_key
from dllm.core.routing import FixedRouting, MarginDial, Router
from dllm.training.loop import param_groups, train
from dllm.training.validation import validate
from helpers import ROOT, make_base, make_dataset, randomize, tiny_args, train_argv
from benchmarks import dial_shares
from tools import calibrate_dial, calibrate_lora_strength, ship_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

BUDGETS = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
PROMPTS = [[1, 5, 9, 12, 40, 7], [1, 33, 8], [1, 20, 21, 22, 23]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path):
    """One ordinary D-LLM run and one budget-conditioned run on the tiny base (3 blocks, routed from
    block 1), each with its threshold dial calibrated beside it, and a copy of the budget-conditioned
    one with an input dial."""
    root = tmp_path_factory.mktemp("dial")
    base = make_base(str(root / "base"), tokenizer_path)[1]
    data = make_dataset(str(root / "data"))
    ordinary, conditioned = root / "dllm", root / "conditioned"
    train(finetuning.parse_args(train_argv(base, data, str(ordinary), epochs=1)))
    train(finetuning.parse_args(train_argv(base, data, str(conditioned), epochs=1, dynamic_active_target=0.7,
                                           dynamic_budget_range=[0.4, 1.0])))
    input_dialled = root / "input"
    shutil.copytree(conditioned, input_dialled)
    for adapter, by in ((ordinary, "threshold"), (conditioned, "threshold"), (input_dialled, "input")):
        calibrate_dial.main(["--llama_ckpt_dir", base, "--dynamic_ckpt_dir", str(adapter), "--dataset_path", data,
                             "--dataset_name", "demo", "--n_records", "48", "--max_seq_len", "48", "--budgets", str(BUDGETS),
                             "--by", by])
    return {"base": base, "data": data, "ordinary": str(ordinary), "conditioned": str(conditioned),
            "input": str(input_dialled)}


def held_out_loader(tokenizer, runs, n_records: int = 48):
    """The demo's first test records, held out from every calibration here (which reads train.json)."""
    return dial.records_loader(dial.calibration_records(tokenizer, runs["data"], "demo", "test", n_records), tokenizer,
                               48, 16)


def held_out_share(generator, runs, budget: float, n_records: int = 48) -> float:
    loader = held_out_loader(generator.tokenizer, runs, n_records)
    generator.set_budget(budget)
    return validate(generator.model, loader, generator.device)["val_act_ratio"]


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["ordinary", "conditioned"])
def test_quantile_dial_meets_the_budget_on_its_records_and_held_out(runs, adapter):
    with open(dial_file.dial_path(runs[adapter])) as f:
        saved = json.load(f)
    assert saved["budgets"] == BUDGETS
    assert saved["achieved_on_calibration"] == pytest.approx(BUDGETS, abs=0.005)
    generator = Llama.build(runs["base"], runs[adapter], max_seq_len=48)
    for budget in (0.45, 0.6, 0.75, 0.9):  # between grid points too
        assert held_out_share(generator, runs, budget) == pytest.approx(budget, abs=0.03)


@pytest.mark.slow
def test_a_conditioned_dial_moves_every_block_alike_and_an_ordinary_one_each_its_own(runs):
    """The budget-conditioned routers' spread of a budget over the blocks is kept: one threshold for
    all of them per budget; an ordinary adapter's per-block quantiles differ."""
    rows = {}
    for adapter in ("ordinary", "conditioned"):
        with open(dial_file.dial_path(runs[adapter])) as f:
            rows[adapter] = json.load(f)["thresholds"]
    assert all(len(set(row)) == 1 for row in rows["conditioned"])
    assert any(len(set(row)) > 1 for row in rows["ordinary"])


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["ordinary", "conditioned", "input"])
def test_more_budget_never_executes_fewer_blocks(runs, adapter):
    generator = Llama.build(runs["base"], runs[adapter], max_seq_len=64)
    tokens = torch.randint(3, generator.tokenizer.n_words, (8, 40), generator=torch.Generator().manual_seed(5))
    executed = []
    with torch.inference_mode():
        for budget in BUDGETS:
            _, activation = generator.model(tokens, budget=torch.full((8,), budget))
            executed.append(activation.sum(-1).flatten())
    for lower, higher in zip(executed, executed[1:]):
        assert higher.mean() >= lower.mean()
        assert (higher >= lower).float().mean() >= 0.9
    assert executed[-1].mean() > executed[0].mean()


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["ordinary", "conditioned", "input"])
def test_a_batch_of_mixed_budgets_routes_each_row_as_alone(runs, adapter):
    generator = Llama.build(runs["base"], runs[adapter], max_seq_len=64, max_batch_size=4)
    budgets = [0.45, 1.0, 0.7]
    together, _, _, stats = generator.generate(PROMPTS, 10, temperature=0.0, budget=budgets)
    for row, (prompt, budget) in enumerate(zip(PROMPTS, budgets)):
        alone, _, _, alone_stats = generator.generate([prompt], 10, temperature=0.0, budget=budget)
        length = alone_stats.lengths[0]
        assert alone[0] == together[row]
        assert torch.equal(alone_stats.activation[0, :length], stats.activation[row, :length])


def test_budget_conditioned_training_holds_each_sequence_to_its_own_target():
    torch.manual_seed(0)
    model = Transformer(tiny_args(dynamic_budget_range=(0.4, 1.0), dynamic_active_target=0.7)).train()
    tokens = torch.randint(3, 320, (6, 12))
    _, activation, state = model.run(tokens)
    budget = state["budget"]
    assert budget.shape == (6,) and ((0.4 <= budget) & (budget <= 1.0)).all() and len(set(budget.tolist())) == 6
    weight = torch.ones(6, 12)
    expected = (activation.mean(-1) - budget[:, None]).abs().mean()
    assert model.routing.aux_loss(model, state, activation, None, weight).item() == pytest.approx(expected.item())
    assert {k for k in model.state_dict() if ".router.budget" in k} == {
        f"layers.{i}.router.{p}" for i in range(1, 4) for p in ("budget.weight", "budget.bias", "budget_gain")}


def test_a_draw_power_draws_low_budgets_more_often():
    """dynamic_budget_draw_power p: a sequence's training target is low + (high - low) * u ** p, the
    uniform u of the plain draw; the power needs a budget range, and must be above 0."""
    args = tiny_args(dynamic_budget_range=(0.4, 1.0), dynamic_active_target=0.7)
    x = torch.zeros(5000, 1, args.dim)
    torch.manual_seed(0)
    plain = Transformer(args).train().routing.row_budget(x, {}, training=True)
    torch.manual_seed(0)
    skewed = Transformer(dataclasses.replace(args, dynamic_budget_draw_power=2.0)).train().routing.row_budget(
        x, {}, training=True)
    assert torch.allclose(skewed, 0.4 + 0.6 * ((plain - 0.4) / 0.6) ** 2, atol=1e-6)
    assert (skewed < 0.55).float().mean().item() == pytest.approx(0.5, abs=0.03)  # the lowest quarter: half the draws
    for overrides in (dict(dynamic_budget_draw_power=2.0, dynamic_budget_range=()),
                      dict(dynamic_budget_draw_power=0.0)):
        with pytest.raises(InputError, match=r"dynamic_budget_draw_power .*: must be 1, or above 0"):
            Transformer(dataclasses.replace(args, **overrides))
    with pytest.raises(InputError, match=r"--dynamic_budget_draw_power 2.0: shapes the draw over "
                                         r"--dynamic_budget_range, which is not set"):
        finetuning.parse_args(train_argv("base", "data", "out", dynamic_budget_draw_power=2.0))


def test_a_relative_rate_loss_holds_each_sequence_to_its_target_in_proportion():
    """rate_loss_gap relative: each token's gap over its own sequence's drawn target, so the same gap
    weighs more at a low budget; per sequence likewise."""
    torch.manual_seed(0)
    model = Transformer(tiny_args(dynamic_budget_range=(0.4, 1.0), dynamic_active_target=0.7,
                                  rate_loss_gap="relative")).train()
    _, activation, state = model.run(torch.randint(3, 320, (6, 12)))
    budget, weight = state["budget"], torch.ones(6, 12)
    expected = ((activation.mean(-1) - budget[:, None]).abs() / budget[:, None]).mean()
    assert model.routing.aux_loss(model, state, activation, None, weight).item() == pytest.approx(expected.item())
    model.routing.args = dataclasses.replace(model.routing.args, rate_loss_unit="sequence")
    expected = ((activation.mean((1, 2)) - budget).abs() / budget).mean()
    assert model.routing.aux_loss(model, state, activation, None, weight).item() == pytest.approx(expected.item())
    with pytest.raises(InputError, match=r"rate_loss_gap 'square': must be one of absolute, relative"):
        Transformer(tiny_args(rate_loss_gap="square"))


def test_budget_routers_blend_the_two_around_a_budget():
    """dynamic_budget_routers: a block's routers sit at evenly spaced budgets over the trained range;
    a budget at an anchor routes by that router alone, one between two by their linear blend, one
    outside the range by the nearest end's; the routers' tensors are adapter tensors of their own, and
    their FLOPs count each router."""
    torch.manual_seed(0)
    args = tiny_args(dynamic_budget_range=(0.4, 1.0), dynamic_active_target=0.7, dynamic_budget_routers=3)
    model = Transformer(args).eval()
    block = model.layers[1].router
    x = torch.randn(4, 5, args.dim)
    budget = torch.tensor([0.4, 0.7, 0.85, 0.1])
    logits = block(x, budget)
    alone = [router(x, budget) for router in block.routers]
    assert torch.allclose(logits[0], alone[0][0]) and torch.allclose(logits[1], alone[1][1])
    assert torch.allclose(logits[2], 0.5 * alone[1][2] + 0.5 * alone[2][2], atol=1e-6)
    assert torch.allclose(logits[3], alone[0][3])
    per_token = block(x[[0, 2]], torch.tensor([[0.4] * 5, [0.85] * 5]))
    assert torch.allclose(per_token, logits[[0, 2]], atol=1e-6)
    keys = {k for k in model.state_dict() if k.startswith("layers.1.router.")}
    assert keys == {f"layers.1.router.routers.{k}.{p}" for k in range(3) for p in (
        "linear_1.weight", "linear_1.bias", "norm.weight", "linear_2.weight", "linear_2.bias", "budget.weight",
        "budget.bias", "budget_gain")} and all(is_adapter_key(k) for k in keys)
    one = Transformer(dataclasses.replace(args, dynamic_budget_routers=1))
    executed, mask = torch.ones(1, 5, args.n_layers), torch.ones(1, 5)
    assert model.routing.cost(executed, mask) == 3 * one.routing.cost(executed, mask)


@pytest.mark.parametrize("overrides, why", [
    (dict(dynamic_budget_routers=2), r"dynamic_budget_routers 2: must be 1, or more for a budget-conditioned D-LLM"),
    (dict(dynamic_budget_routers=0, dynamic_budget_range=(0.4, 1.0), dynamic_active_target=0.7),
     r"dynamic_budget_routers 0: must be 1")])
def test_budget_routers_need_a_budget_range(overrides, why):
    with pytest.raises(InputError, match=why):
        Transformer(tiny_args(**overrides))


def test_the_budget_routers_flag_needs_a_budget_range():
    with pytest.raises(InputError, match=r"--dynamic_budget_routers 2: routers share out --dynamic_budget_range, "
                                         r"which is not set"):
        finetuning.parse_args(train_argv("base", "data", "out", dynamic_budget_routers=2))


@pytest.mark.slow
def test_an_adapter_with_budget_routers_trains_saves_and_serves_its_budgets(runs, tmp_path):
    """DYNAMIC_BUDGET_ROUTERS: trained, saved in params.json, and built again with the same routers,
    which route a generation at the budgets of the range."""
    out = tmp_path / "routers"
    train(finetuning.parse_args(train_argv(runs["base"], runs["data"], str(out), epochs=1, dynamic_active_target=0.7,
                                           dynamic_budget_range=[0.4, 1.0], dynamic_budget_routers=2,
                                           lambda_active=20.0)))
    with open(out / "params.json") as f:
        assert json.load(f)["dynamic_budget_routers"] == 2
    generator = Llama.build(runs["base"], str(out), max_seq_len=48)
    saved = adapters.read_adapter(str(out))["model"]
    for k in range(2):
        key = f"layers.1.router.routers.{k}.linear_1.weight"
        assert torch.equal(generator.model.state_dict()[key], saved[key])
    tokens = torch.randint(3, generator.tokenizer.n_words, (8, 40), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        shares = [generator.model(tokens, budget=torch.full((8,), b))[1].mean().item() for b in (0.4, 1.0)]
    assert shares[1] == 1.0 and shares[0] < 0.85


def test_a_budget_conditioned_lora_blends_its_gains_around_the_budget():
    """dynamic_budget_lora: a gain per LoRA rank at evenly spaced budgets over the trained range; at
    gains of 1 (its start) the LoRA is the plain one; a budget at an anchor takes that anchor's gains,
    one between two their blend, one outside the range the nearest end's; the gains are adapter
    tensors, kept out of weight decay and at their own lr; its FLOPs (never merged) count in every block a token runs."""
    torch.manual_seed(0)
    args = tiny_args(dynamic_budget_range=(0.4, 1.0), dynamic_active_target=0.7, dynamic_budget_lora=3)
    lora = Transformer(args).layers[1].attention.lora_q
    plain = Transformer(dataclasses.replace(args, dynamic_budget_lora=0)).layers[1].attention.lora_q
    with torch.no_grad():
        lora.linear_B.weight.normal_()
    plain.load_state_dict({k: v for k, v in lora.state_dict().items() if k != "budget_gates"})
    x, budget = torch.randn(4, 5, args.dim), torch.tensor([[0.4], [0.7], [0.85], [0.1]])
    anchors = anchor_weights(budget, args.dynamic_budget_range, args.dynamic_budget_lora)
    assert torch.allclose(lora(x, anchors), plain(x), atol=1e-6)
    with torch.no_grad():
        lora.budget_gates.normal_()
    gates = lora.budget_gates
    expected = torch.stack([gates[0], gates[1], 0.5 * gates[1] + 0.5 * gates[2], gates[0]])[:, None]
    assert torch.allclose(lora.gate(anchors), expected, atol=1e-6)
    assert torch.allclose(lora(x, anchors), plain.linear_B(plain.linear_A(x) * expected) * plain.scale, atol=1e-5)
    model = Transformer(args)
    keys = {k for k in model.state_dict() if k.endswith(".budget_gates")}
    assert len(keys) == 3 * args.n_layers and all(is_adapter_key(k) for k in keys)
    executed, mask = torch.ones(1, 5, args.n_layers), torch.ones(1, 5)
    lora_flops = 2 * args.lora_rank * (args.dim + args.n_heads * args.head_dim) \
        + 4 * args.lora_rank * (args.dim + args.n_kv_heads * args.head_dim)
    plain_model = Transformer(dataclasses.replace(args, dynamic_budget_lora=0))
    assert model.routing.cost(executed, mask) == plain_model.routing.cost(executed, mask) + 5 * args.n_layers * lora_flops
    groups = {id(p): (group["weight_decay"], group["lr_scale"]) for group in param_groups(model, 0.02, 1.0, 50.0)
              for p in group["params"]}
    assert groups[id(model.layers[1].attention.lora_q.budget_gates)] == (0.0, 50.0)
    assert groups[id(model.layers[1].attention.lora_q.linear_A.weight)] == (0.02, 1.0)


def test_a_budget_conditioned_lora_serves_a_mixed_batch_each_row_as_alone_and_hears_the_dial():
    """With gains that differ by budget, a batch of mixed budgets gives each row the logits and
    routing it has alone; under an input dial the LoRA is told what the routers are told."""
    args = tiny_args(dynamic_budget_range=(0.4, 1.0), dynamic_active_target=0.7, dynamic_budget_lora=2)
    model = randomize(Transformer(args), 3, router_scale=1.0, lora_b_std=0.5).eval()
    with torch.no_grad():
        for layer in model.layers:
            for part in (layer.attention.lora_q, layer.attention.lora_k, layer.attention.lora_v):
                part.budget_gates.copy_(torch.tensor([[3.0] * args.lora_rank, [-1.0] * args.lora_rank]))
    tokens = torch.randint(3, args.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    budgets = torch.tensor([0.45, 1.0, 0.7])
    with torch.inference_mode():
        together, activation = model(tokens, budget=budgets)
        for row in range(3):
            alone, alone_activation = model(tokens[row : row + 1], budget=budgets[row : row + 1])
            assert torch.allclose(alone[0], together[row], atol=1e-5)
            assert torch.equal(alone_activation[0], activation[row])
        model.routing.dial = MarginDial(torch.tensor([0.5, 1.0]), torch.zeros(2, args.n_layers),
                                        inputs=torch.tensor([0.45, 0.95]))
        asked = torch.tensor([0.75])
        through_dial, _ = model(tokens[:1], budget=asked)
        told = model.routing.told_budget(asked)
        model.routing.dial = None
        direct, _ = model(tokens[:1], budget=told)
    assert told.item() == pytest.approx(0.70)  # the LoRA's gains differ there from the asked 0.75's
    assert torch.equal(through_dial, direct)


@pytest.mark.parametrize("overrides, why", [
    (dict(dynamic_budget_lora=2), r"dynamic_budget_lora 2: must be 0, or 2 or more for a budget-conditioned D-LLM"),
    (dict(dynamic_budget_lora=1, dynamic_budget_range=(0.4, 1.0), dynamic_active_target=0.7),
     r"dynamic_budget_lora 1: must be 0, or 2 or more"),
    (dict(dynamic_budget_lora=2, dynamic_budget_range=(0.4, 1.0), dynamic_active_target=0.7, lora_rank=0),
     r"dynamic_budget_lora 2: must be 0, or 2 or more .* with a LoRA")])
def test_a_budget_conditioned_lora_needs_a_budget_range_and_a_lora(overrides, why):
    with pytest.raises(InputError, match=why):
        Transformer(tiny_args(**overrides))


@pytest.mark.parametrize("overrides, why", [
    (dict(dynamic_budget_lora=2), r"--dynamic_budget_lora 2: the LoRA's gains share out --dynamic_budget_range, "
                                  r"which is not set"),
    (dict(dynamic_budget_lora=1, dynamic_budget_range=[0.4, 1.0], dynamic_active_target=0.7),
     r"--dynamic_budget_lora 1: gains at one budget are one LoRA for every budget"),
    (dict(budget_lora_lr=0.03), r"--budget_lora_lr 0.03: sets the lr of a budget-conditioned LoRA's gains, and "
                                r"--dynamic_budget_lora is not set")])
def test_the_budget_conditioned_lora_flag_is_checked(overrides, why):
    with pytest.raises(InputError, match=why):
        finetuning.parse_args(train_argv("base", "data", "out", **overrides))


@pytest.mark.slow
def test_an_adapter_with_a_budget_conditioned_lora_trains_saves_and_serves_mixed_budgets(runs, tmp_path, capsys):
    """DYNAMIC_BUDGET_LORA: trained (its gains move off 1, at the lr its start line names), saved in
    params.json, built again with the LoRA kept unmerged and the trained gains, and a generation of
    mixed budgets gives each row what it gets alone."""
    out = tmp_path / "lora"
    train(finetuning.parse_args(train_argv(runs["base"], runs["data"], str(out), epochs=1, dynamic_active_target=0.7,
                                           dynamic_budget_range=[0.4, 1.0], dynamic_budget_lora=2,
                                           budget_lora_lr=0.05, lambda_active=20.0)))
    assert "budget LoRA gains lr 0.05" in capsys.readouterr().out
    with open(out / "params.json") as f:
        assert json.load(f)["dynamic_budget_lora"] == 2
    saved = adapters.read_adapter(str(out))["model"]
    key = "layers.1.attention.lora_v.budget_gates"
    assert not torch.equal(saved[key], torch.ones_like(saved[key]))
    generator = Llama.build(runs["base"], str(out), max_seq_len=64, max_batch_size=4)
    attention = generator.model.layers[1].attention
    assert attention.lora_v is not None and attention.merged_strength is None
    assert torch.equal(attention.lora_v.budget_gates, saved[key])
    budgets = [0.45, 1.0, 0.7]
    together, _, _, stats = generator.generate(PROMPTS, 10, temperature=0.0, budget=budgets)
    for row, (prompt, budget) in enumerate(zip(PROMPTS, budgets)):
        alone, _, _, alone_stats = generator.generate([prompt], 10, temperature=0.0, budget=budget)
        assert alone[0] == together[row]
        length = alone_stats.lengths[0]
        assert torch.equal(alone_stats.activation[0, :length], stats.activation[row, :length])


def test_a_higher_budget_raises_every_execute_margin_from_the_first_step():
    """At initialisation the budget's log-odds shifts the execute logit, so a fresh budget-conditioned
    router already executes more where it is given more budget, for every token."""
    torch.manual_seed(0)
    router = Router(16, 8, 1e-5, (0.1, 2.0), budget_input=True)
    x = torch.randn(1, 5, 16).expand(3, 5, 16)
    logits = router(x, torch.tensor([0.4, 0.7, 1.0]))
    margin = logits[..., 1] - logits[..., 0]
    assert (margin[1] > margin[0]).all() and (margin[2] > margin[1]).all()
    assert torch.allclose(margin[1] - margin[0], (torch.logit(torch.tensor(0.7)) - torch.logit(torch.tensor(0.4))).expand(5))
    assert torch.isfinite(margin).all()


def test_inference_reuses_the_budget_terms_until_the_weights_change():
    """Without grad the same budget tensor reuses its terms (generation asks at every step); a load
    into the router after that is seen, and the logits always equal a fresh computation's."""
    torch.manual_seed(0)
    router = Router(16, 8, 1e-5, (0.1, 2.0), budget_input=True)
    x, budget = torch.randn(2, 3, 16), torch.tensor([0.5, 0.9])
    with torch.inference_mode():
        first = router(x, budget)
        assert router.budget_terms(budget) is router.budget_terms(budget)
        router.load_state_dict({**router.state_dict(), "budget.weight": torch.randn(8, 1)})
        after_load = router(x, budget)
        assert router(x, budget.clone()).equal(after_load)
    fresh = Router(16, 8, 1e-5, (0.1, 2.0), budget_input=True)
    fresh.load_state_dict(router.state_dict())
    assert not after_load.equal(first)
    assert torch.allclose(after_load, fresh(x, budget))
    with torch.inference_mode():  # weights made here count no versions: computed every time, still right
        made_here = Router(16, 8, 1e-5, (0.1, 2.0), budget_input=True)
        made_here.load_state_dict(router.state_dict())
        made_here(x, budget)
        assert torch.allclose(made_here(x, budget), after_load)


def test_an_adapter_without_the_option_keeps_its_keys_and_params():
    with open(f"{ROOT}/assets/tiny-dllm/params.json") as f:
        args = ModelArgs.from_dict(json.load(f))
    assert args.dynamic_budget_range == ()
    model = Transformer(tiny_args())
    assert not [k for k in model.state_dict() if is_adapter_key(k) and ".budget." in k]


@pytest.mark.slow
def test_a_budget_the_adapter_cannot_meet_is_one_line(runs, tmp_path):
    with pytest.raises(InputError, match=r"calibrated for budgets 0.40 to 1.00"):
        Llama.build(runs["base"], runs["ordinary"], max_seq_len=48, budget=0.3)
    undialled = tmp_path / "undialled"
    shutil.copytree(runs["conditioned"], undialled, ignore=shutil.ignore_patterns("*.dial.json"))
    with pytest.raises(InputError, match=r"trained for budgets 0.40 to 1.00"):
        Llama.build(runs["base"], str(undialled), max_seq_len=48, budget=0.35)
    generator = Llama.build(runs["base"], str(undialled), max_seq_len=48)
    with pytest.raises(InputError, match=r"2 budgets for 3 prompts"):
        generator.generate(PROMPTS, 2, budget=[0.5, 0.6])
    with pytest.raises(InputError, match=r"needs a D-LLM adapter"):
        Llama.build(runs["base"], None, max_seq_len=48, budget=0.5)
    undialled = tmp_path / "undialled-ordinary"
    shutil.copytree(runs["ordinary"], undialled, ignore=shutil.ignore_patterns("*.dial.json"))
    with pytest.raises(InputError, match=r"trained for one target \(0.5\) and has no calibrated dial"):
        Llama.build(runs["base"], str(undialled), max_seq_len=48, budget=0.5)


@pytest.mark.slow
def test_the_shipped_adapter_evaluates_as_before(tmp_path):
    """evaluate.py on the shipped demo adapter and the first 40 demo test records: the rows main's
    code wrote before the dial existed (tests/reference/tiny_dllm_demo40.json), exactly."""
    data = tmp_path / "datasets" / "demo"
    data.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "datasets", "demo", "prompt.json"), data / "prompt.json")
    with open(os.path.join(ROOT, "datasets", "demo", "test.json")) as f:
        (data / "test.json").write_text(json.dumps(json.load(f)[:40]))
    config = evaluate.EvalConfig(llama_ckpt_dir=os.path.join(ROOT, "assets", "tiny-llama2"),
                                 shipped_adapters=os.path.join(ROOT, "assets"), dataset_path=str(tmp_path / "datasets"),
                                 output_dir=str(tmp_path / "out"))
    evaluate.evaluate(config)
    with open(os.path.join(ROOT, "tests", "reference", "tiny_dllm_demo40.json")) as f:
        expected = json.load(f)["rows"]
    assert evaluate.read_results(str(tmp_path / "out")) == expected


def test_the_dial_benchmark_sums_each_prompts_best_time(monkeypatch):
    """Generation speed is total tokens over the total of each prompt's best time, for the run and
    for the dense base alike (a run twice as fast on every prompt is 2x dense)."""
    from types import SimpleNamespace

    from benchmarks import dial_demo

    class Fake:
        def __init__(self, tokens):
            self.tokens, self.device = tokens, "cpu"

        def generate(self, prompts, max_gen_len, **kwargs):
            return SimpleNamespace(tokens=[[0] * self.tokens])

    clock = iter([2.0, 1.0, 3.0, 0.5, 4.0, 2.0, 5.0, 1.0])  # dense, run, dense, run per repeat, two prompts
    monkeypatch.setattr(dial_demo, "timed", lambda call, device: (next(clock), call()))
    bench = object.__new__(dial_demo.Bench)
    bench.config, bench.prompts, bench.dense = SimpleNamespace(repeats=2, max_gen_len=8), [[1], [2]], Fake(10)
    tok_s, x_dense = bench.generation_speedup(Fake(10))
    # best run times 0.5 and 1.0, best dense 2.0 and 4.0
    assert tok_s == pytest.approx(20 / 1.5) and x_dense == pytest.approx((20 / 1.5) / (20 / 6.0))


def test_the_mixed_batch_timing_serves_each_row_its_budget_and_compares_on_the_same_batch(monkeypatch, tmp_path):
    """dial_demo's mixed batch: the prompts in one batch with --budgets in turn, against the dense base
    and every row at the budgets' mean on the same prompts, each the best of its repeats."""
    from types import SimpleNamespace

    from benchmarks import dial_demo

    asked = []

    class Fake:
        def __init__(self):
            self.device, self.model = "cpu", SimpleNamespace(routing=SimpleNamespace(dial="calibrated"))

        def generate(self, prompts, max_gen_len, budget=None, **kwargs):
            asked.append(budget)
            shares = budget if isinstance(budget, list) else [0.9] * len(prompts)
            return SimpleNamespace(tokens=[[0] * 4] * len(prompts), routing=SimpleNamespace(exec_share=lambda i: shares[i]))

    clock = iter([3.0, 1.0, 2.0, 4.0, 2.0, 1.0])  # dense, mixed, uniform; twice
    monkeypatch.setattr(dial_demo, "timed", lambda call, device: (next(clock), call()))
    bench = object.__new__(dial_demo.Bench)
    generator = Fake()
    bench.build = lambda adapter: generator
    bench.config = SimpleNamespace(repeats=2, max_gen_len=4, budgets=[0.5, 1.0])
    bench.prompts, bench.dense = [[1], [2], [3]], Fake()
    adapter = tmp_path / "adapter.pth"
    adapter.touch()
    row = bench.mixed_batch_row(str(adapter))
    assert asked[:3] == [None, [0.5, 1.0, 0.5], pytest.approx(2 / 3)]
    assert generator.model.routing.dial is None  # the routers' budget input, not the calibrated dial
    assert row["row_exec_shares"] == [0.5, 1.0, 0.5] and row["budgets"] == [0.5, 1.0, 0.5]
    # best dense 3.0, mixed 1.0, uniform 1.0; 12 tokens each
    assert row["gen_x_dense"] == pytest.approx(3.0) and row["uniform_x_dense"] == pytest.approx(3.0)


def test_an_eval_forward_with_grad_after_inference_still_reaches_the_budget_weights():
    """The budget tensor and terms kept for generation are not reused where grad is on (a tensor made
    under inference_mode cannot be saved for backward)."""
    torch.manual_seed(0)
    model = Transformer(tiny_args(dynamic_budget_range=(0.4, 1.0), dynamic_active_target=0.7)).eval()
    tokens = torch.randint(3, 320, (2, 6))
    with torch.inference_mode():
        model(tokens)
    model(tokens)
    x = torch.randn(2, 6, model.params.dim)
    router = model.layers[1].router
    logits = router(x, model.routing.row_budget(x, {}, training=False))
    (grad,) = torch.autograd.grad(logits.sum(), router.budget.weight)
    assert grad.abs().sum() > 0


def test_a_lora_strength_interpolates_between_its_budgets():
    strength = dial_file.LoraStrength([0.5, 0.75, 1.0], [1.0, 0.5, 0.0])
    assert [strength.at(b) for b in (0.4, 0.5, 0.625, 0.875, 1.0)] == [1.0, 1.0, 0.75, 0.25, 0.0]


def merged_strengths(generator) -> list:
    """The distinct LoRA strengths merged into the model's blocks (one, when a strength is set)."""
    return sorted({layer.attention.merged_strength for layer in generator.model.layers})


def attention_weights(generator) -> list:
    return [w.weight.clone() for layer in generator.model.layers for w in (layer.attention.wq, layer.attention.wk,
                                                                            layer.attention.wv)]


@pytest.mark.slow
def test_the_lora_strength_follows_the_budget_asked(runs, tmp_path):
    """A budget-conditioned adapter with a strength schedule beside it has its LoRA merged at the
    strength of the budget asked: by Llama.build, set_budget or one generate call; merged again after
    other strengths, the weights are those of one merge; strength 1 is the adapter as trained, and a
    merged strength gives the logits of the LoRA unmerged at that strength; a batch of mixed budgets
    is refused in one line."""
    adapter = tmp_path / "conditioned"
    shutil.copytree(runs["conditioned"], adapter, ignore=shutil.ignore_patterns("*.dial.json"))
    calibration = ["--llama_ckpt_dir", runs["base"], "--dataset_path", runs["data"], "--dataset_name", "demo",
                   "--n_records", "16", "--max_seq_len", "48", "--budgets", "[0.4, 1.0]", "--strengths", "[0.0, 1.0]"]
    with pytest.raises(InputError, match=r"trained for one target"):
        calibrate_lora_strength.main(calibration + ["--dynamic_ckpt_dir", runs["ordinary"]])
    as_trained = Llama.build(runs["base"], str(adapter), max_seq_len=48, budget=0.4, keep_lora=True)
    path = calibrate_lora_strength.main(calibration + ["--dynamic_ckpt_dir", str(adapter)])
    with open(path) as f:
        written = json.load(f)
    assert written["budgets"] == [0.4, 1.0]
    assert written["strengths"] == [[0.0, 1.0][min((0, 1), key=row.__getitem__)] for row in written["kl_on_calibration"]]
    with pytest.raises(InputError, match=r"already exists"):
        calibrate_lora_strength.main(calibration + ["--dynamic_ckpt_dir", str(adapter)])

    provenance = {k: v for k, v in written.items() if k not in ("adapter_sha256", "budgets", "strengths")}
    dial_file.write_lora_strength(dial_file.LoraStrength([0.4, 1.0], [1.0, 0.0]), path, written["adapter_sha256"],
                                  provenance)
    generator = Llama.build(runs["base"], str(adapter), max_seq_len=48, budget=0.7)
    assert merged_strengths(generator) == [pytest.approx(0.5)]
    tokens = torch.tensor([PROMPTS[0]])
    unmerged = Llama.build(runs["base"], str(adapter), max_seq_len=48, budget=0.7, keep_lora=True)
    assert merged_strengths(unmerged) == [None]
    with torch.no_grad():
        torch.testing.assert_close(generator.model(tokens)[0], unmerged.model(tokens)[0])
    at_trained_strength = attention_weights(Llama.build(runs["base"], str(adapter), max_seq_len=48, budget=0.4))
    generator.set_budget(0.4)
    assert merged_strengths(generator) == [1.0]
    assert all(torch.equal(a, b) for a, b in zip(attention_weights(generator), at_trained_strength))
    with torch.no_grad():
        torch.testing.assert_close(generator.model(tokens)[0], as_trained.model(tokens)[0])
    at_one = Llama.build(runs["base"], str(adapter), max_seq_len=48, budget=1.0)
    assert merged_strengths(at_one) == [0.0]
    called = generator.generate(PROMPTS, 4, temperature=0, budget=1.0)
    assert called.tokens == at_one.generate(PROMPTS, 4, temperature=0).tokens
    assert merged_strengths(generator) == [1.0], "a call's budget lasts for the call"
    assert all(torch.equal(a, b) for a, b in zip(attention_weights(generator), at_trained_strength))
    with pytest.raises(InputError, match=r"one for the whole batch"):
        generator.generate(PROMPTS, 2, budget=[0.4, 1.0, 0.7])

    dial_file.write_lora_strength(dial_file.LoraStrength([0.4, 1.0], [1.0, 0.0]), path, "0" * 64, provenance)
    with pytest.raises(InputError, match=r"another version"):
        Llama.build(runs["base"], str(adapter), max_seq_len=48)


def test_a_shipped_adapter_keeps_its_dial_and_lora_strength(runs, tmp_path):
    """tools/ship_adapter.py copies the calibrations beside a run's checkpoint with it: they name the
    adapter by its tensors' checksum, so the shipped copy (no optimizer state) meets each budget with
    the run's router inputs and LoRA strengths, and generates the run's tokens."""
    run_dir, shipped = tmp_path / "run", tmp_path / "shipped"
    shutil.copytree(runs["input"], run_dir)
    checkpoint = adapters.adapter_file(str(run_dir))
    strengths = dial_file.LoraStrength([0.4, 1.0], [2.0, 0.0])
    dial_file.write_lora_strength(strengths, dial_file.lora_strength_path(checkpoint),
                                  adapters.read_adapter(checkpoint)["adapter_sha256"], {})
    ship_adapter.main(str(run_dir), str(shipped))
    assert sorted(p.name for p in shipped.glob("checkpoint.*")) == [
        "checkpoint.dial.json", "checkpoint.lora_strength.json", "checkpoint.pth"]
    for budget in (0.5, 0.9):
        as_run = Llama.build(runs["base"], str(run_dir), max_seq_len=48, budget=budget)
        as_shipped = Llama.build(runs["base"], str(shipped), max_seq_len=48, budget=budget)
        assert merged_strengths(as_shipped) == merged_strengths(as_run) == [pytest.approx(strengths.at(budget))]
        assert torch.equal(as_shipped.model.routing.dial.inputs, as_run.model.routing.dial.inputs)
        assert as_shipped.generate(PROMPTS, 6, temperature=0).tokens == as_run.generate(PROMPTS, 6, temperature=0).tokens


@pytest.mark.slow
def test_dial_shares_counts_what_the_model_executes(runs, tmp_path):
    """benchmarks/dial_shares.py's share run, read from the routers' margins, is the share the model
    executes through its router input alone (validate's), at every budget."""
    out = tmp_path / "shares.json"
    dial_shares.main(dial_shares.DialSharesConfig(
        llama_ckpt_dir=runs["base"], dataset_path=runs["data"], dataset_name="demo", split="test", records=48,
        max_seq_len=48, batch_size=16, adapters=[f"conditioned={runs['conditioned']}"], budgets=[0.4, 0.7, 1.0],
        out=str(out)))
    rows = json.loads(out.read_text())["rows"]
    generator = Llama.build(runs["base"], runs["conditioned"], max_seq_len=48)
    generator.model.routing.dial = None
    assert [r["share_run"] for r in rows] == pytest.approx(
        [held_out_share(generator, runs, b) for b in (0.4, 0.7, 1.0)], abs=1e-6)


@pytest.mark.slow
def test_an_input_dial_meets_the_budget_by_what_it_tells_the_routers(runs, tmp_path):
    """--by input: the routers of a budget-conditioned adapter are told the calibrated budget and keep
    their own rule: its logits are those of the adapter told that budget without a dial; the told
    budget rises with the budget asked, and the share meets it held out. It is refused for an
    adapter trained for one target, in the calibration and beside it."""
    argv = ["--llama_ckpt_dir", runs["base"], "--dynamic_ckpt_dir", runs["ordinary"], "--dataset_path", runs["data"],
            "--dataset_name", "demo", "--n_records", "48", "--max_seq_len", "48", "--by", "input", "--overwrite"]
    with pytest.raises(InputError, match=r"trained for one target"):
        calibrate_dial.main(argv)
    with open(dial_file.dial_path(runs["input"])) as f:
        saved = json.load(f)
    told = saved["router_inputs"]
    assert told == sorted(told) and told[0] < told[-1]
    assert saved["achieved_on_calibration"][:-1] == pytest.approx(BUDGETS[:-1], abs=0.02)

    dialled = Llama.build(runs["base"], runs["input"], max_seq_len=48)
    plain = Llama.build(runs["base"], runs["input"], max_seq_len=48)
    plain.model.routing.dial = None
    tokens = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        asked = dialled.model(tokens, budget=torch.tensor([0.6]))
        told_alone = plain.model(tokens, budget=torch.tensor([told[BUDGETS.index(0.6)]]))
    torch.testing.assert_close(asked[0], told_alone[0])
    assert torch.equal(asked[1], told_alone[1])
    for budget in (0.45, 0.75):
        assert held_out_share(dialled, runs, budget) == pytest.approx(budget, abs=0.05)

    ordinary = tmp_path / "ordinary"
    shutil.copytree(runs["ordinary"], ordinary)
    input_dial = dial_file.read_dial(runs["input"], n_layers=3)
    own_checksum = adapters.read_adapter(str(ordinary)).get("adapter_sha256")
    dial_file.write_dial(input_dial, dial_file.dial_path(str(ordinary)), own_checksum, saved["achieved_on_calibration"], {})
    with pytest.raises(InputError, match=r"an input dial .* trained for one target"):
        Llama.build(runs["base"], str(ordinary), max_seq_len=48)


@pytest.mark.slow
def test_a_dial_calibrated_on_response_tokens_meets_the_budget_there_held_out(runs, tmp_path):
    """--share_on response: the budget is met on the tokens a generation decodes, on the calibration
    records and held out; the file says which tokens it counted."""
    adapter = tmp_path / "response"
    shutil.copytree(runs["ordinary"], adapter)
    calibrate_dial.main(["--llama_ckpt_dir", runs["base"], "--dynamic_ckpt_dir", str(adapter), "--dataset_path",
                         runs["data"], "--dataset_name", "demo", "--n_records", "48", "--max_seq_len", "48",
                         "--budgets", "[0.5, 0.7]", "--share_on", "response", "--overwrite"])
    with open(dial_file.dial_path(str(adapter))) as f:
        saved = json.load(f)
    assert saved["share_on"] == "response"
    assert saved["achieved_on_calibration"] == pytest.approx([0.5, 0.7], abs=0.005)
    loader = held_out_loader(Llama.build(runs["base"], max_seq_len=48).tokenizer, runs)
    generator = Llama.build(runs["base"], str(adapter), max_seq_len=48)
    for budget in (0.5, 0.7):
        generator.set_budget(budget)
        assert validate(generator.model, loader, generator.device, share_on="response")["val_act_ratio"] == \
            pytest.approx(budget, abs=0.03)


def share_in_generation(generator, prompts, budget: float, max_gen_len: int) -> float:
    """The share of blocks greedy generation runs over what it feeds, prompt and answer, at `budget`."""
    stop_ids = ChatFormat(generator.tokenizer).stop_ids
    executed = fed = 0
    for at in range(0, len(prompts), 16):
        stats = generator.generate(prompts[at : at + 16], max_gen_len, temperature=0.0, actprobs=False,
                                   stop_ids=stop_ids, budget=budget).routing
        executed += sum(float(stats.activation[row, :length].sum()) for row, length in enumerate(stats.lengths))
        fed += sum(stats.lengths)
    return executed / (fed * generator.model.n_layers)


@pytest.mark.slow
@pytest.mark.parametrize("base, adapter, dataset, budgets, max_gen_len", [
    ("smollm2", "smollm2-dial", "smol", (0.5, 0.875), 96),
    ("tiny-llama2", "tiny-dllm-dial", "demo", (0.4, 0.85), 64),
])
def test_a_shipped_dial_meets_its_budgets_in_generation_held_out(request, base, adapter, dataset, budgets, max_gen_len):
    """A shipped dial adapter (its dial, and its LoRA strengths where it has them, beside it) meets a
    low and a high budget within the issue's 0.03 in greedy generation on validation prompts, which
    its dial was not calibrated on (the first training records were)."""
    base_dir = request.getfixturevalue("smollm2_dir") if base == "smollm2" else os.path.join(ROOT, "assets", base)
    generator = Llama.build(base_dir, os.path.join(ROOT, "assets", adapter), max_seq_len=384, max_batch_size=16)
    records = load_records(os.path.join(ROOT, "datasets"), dataset, "validation", ChatFormat(generator.tokenizer))
    prompts = [generator.tokenizer.encode(r.prompt, bos=True, eos=False) for r in records[:16]]
    shares = {budget: share_in_generation(generator, prompts, budget, max_gen_len) for budget in budgets}
    assert all(shares[b] == pytest.approx(b, abs=0.03) for b in budgets), shares


@pytest.mark.slow
@pytest.mark.parametrize("adapter, by", [("conditioned", "input"), ("ordinary", "threshold")])
def test_a_dial_calibrated_in_generation_meets_the_budget_there_held_out(runs, tmp_path, adapter, by):
    """--share_on generation: the budget is met over what greedy generation runs, prompt and the
    model's own answer, on the calibration prompts and on held-out ones; the file says so and keeps
    the answers' length."""
    copy = tmp_path / adapter
    shutil.copytree(runs[adapter], copy)
    calibrate_dial.main(["--llama_ckpt_dir", runs["base"], "--dynamic_ckpt_dir", str(copy), "--dataset_path",
                         runs["data"], "--dataset_name", "demo", "--n_records", "48", "--max_seq_len", "48",
                         "--budgets", "[0.5, 0.7]", "--by", by, "--share_on", "generation", "--max_gen_len", "16",
                         "--overwrite"])
    with open(dial_file.dial_path(str(copy))) as f:
        saved = json.load(f)
    assert saved["share_on"] == "generation" and saved["max_gen_len"] == 16
    assert saved["achieved_on_calibration"] == pytest.approx([0.5, 0.7], abs=0.03)
    generator = Llama.build(runs["base"], str(copy), max_seq_len=48, max_batch_size=16)
    records = dial.calibration_records(generator.tokenizer, runs["data"], "demo", "test", 48)
    prompts = [generator.tokenizer.encode(r.prompt, bos=True, eos=False)[-47:] for r in records]
    for budget in (0.5, 0.7):
        assert share_in_generation(generator, prompts, budget, 16) == pytest.approx(budget, abs=0.03)


@pytest.fixture(scope="module")
def phased(runs, tmp_path_factory):
    """A copy of the budget-conditioned run with a dial per phase (--share_on phases) at 0.5 and 0.7."""
    adapter = tmp_path_factory.mktemp("phased") / "adapter"
    shutil.copytree(runs["conditioned"], adapter)
    calibrate_dial.main(["--llama_ckpt_dir", runs["base"], "--dynamic_ckpt_dir", str(adapter), "--dataset_path",
                         runs["data"], "--dataset_name", "demo", "--n_records", "48", "--max_seq_len", "48",
                         "--budgets", "[0.5, 0.7]", "--by", "input", "--share_on", "phases", "--overwrite"])
    return str(adapter)


@pytest.mark.slow
def test_a_dial_per_phase_meets_the_budget_on_prompt_and_response_held_out(runs, phased):
    """--share_on phases: one router input for prompt tokens and one for response tokens, each meeting
    the budget on its own tokens, on held-out records too; it needs an input dial."""
    with open(dial_file.dial_path(phased)) as f:
        saved = json.load(f)
    assert saved["share_on"] == "phases" and len(saved["prompt_router_inputs"]) == 2
    assert saved["prompt_router_inputs"] != saved["router_inputs"]
    loader = held_out_loader(Llama.build(runs["base"], max_seq_len=48).tokenizer, runs)
    generator = Llama.build(runs["base"], phased, max_seq_len=48)
    for budget in (0.5, 0.7):
        generator.set_budget(budget)
        for phase in ("prompt", "response"):
            assert validate(generator.model, loader, generator.device, share_on=phase)["val_act_ratio"] == \
                pytest.approx(budget, abs=0.05)
    with pytest.raises(InputError, match=r"--share_on phases: an input per phase, for a dial --by input"):
        calibrate_dial.main(["--llama_ckpt_dir", runs["base"], "--dynamic_ckpt_dir", phased, "--dataset_path",
                             runs["data"], "--dataset_name", "demo", "--n_records", "8", "--max_seq_len", "48",
                             "--budgets", "[0.5]", "--share_on", "phases", "--overwrite"])


@pytest.mark.slow
def test_a_dial_per_phase_routes_a_generation_as_its_scored_record(runs, phased):
    """A generation's prefill is told the prompt's input and its decode the response's: its routing
    equals the teacher-forced routing of what it fed with the answer marked, row by row in a batch of
    ragged prompts (whose early decode steps still feed prompt tokens), and its prompt's routing that of
    the adapter told the prompt input without a dial."""
    generator = Llama.build(runs["base"], phased, max_seq_len=48, max_batch_size=len(PROMPTS))
    generation = generator.generate(PROMPTS, max_gen_len=10, temperature=0.0, budget=0.5)
    stats = generation.routing
    generator.set_budget(0.5)
    for row, (prompt, fed) in enumerate(zip(PROMPTS, stats.tokens)):
        scored = scoring.teacher_forced(generator.model, [(fed[: len(prompt)], fed[len(prompt):])], 48)
        assert torch.equal(stats.activation[row, : len(fed)], scored.activation[0])

    plain = Llama.build(runs["base"], phased, max_seq_len=48)
    told = plain.model.routing.dial.prompt_inputs[0]
    plain.model.routing.dial = None
    with torch.inference_mode():
        _, prompt_alone = plain.model(torch.tensor([PROMPTS[0]]), budget=told.reshape(1))
    assert torch.equal(stats.activation[0, : len(PROMPTS[0])], prompt_alone[0])


@pytest.mark.slow
@pytest.mark.parametrize("key, value, why", [
    ("prompt_router_inputs", [0.4, 1.5], r"prompt_router_inputs must be 2 budgets in \[0, 1\], one per budget"),
    ("router_inputs", None, r"prompt_router_inputs without router_inputs")])
def test_a_malformed_dial_per_phase_is_one_line(runs, phased, tmp_path, key, value, why):
    adapter = tmp_path / "adapter"
    shutil.copytree(phased, adapter)
    path = dial_file.dial_path(str(adapter))
    with open(path) as f:
        saved = json.load(f)
    saved[key] = value
    with open(path, "w") as f:
        json.dump({k: v for k, v in saved.items() if v is not None}, f)
    with pytest.raises(InputError, match=rf"{path}: not a valid dial \({why}\)"):
        dial_file.read_dial(str(adapter), n_layers=3)


def test_the_share_on_response_tokens_counts_them_alone():
    """validate's share_on: a model that runs every block on the response tokens and only the first
    block on the prompt executes all of them there, and a quarter on the prompt counts in the share
    over all tokens (the reserved first position always runs)."""
    model = Transformer(tiny_args(dynamic_reserve_initials=1))
    prompt, response = 4, 4
    executes = torch.tensor([[False] * prompt + [True] * response])
    model.use_routing(FixedRouting({layer: executes for layer in (1, 2, 3)}))
    ones = torch.ones(1, prompt + response, dtype=torch.long)
    label_masks = executes.long()
    batch = (torch.zeros(1), torch.arange(1, 9)[None], torch.arange(2, 10)[None], ones, label_masks)
    assert validate(model, [batch], "cpu", share_on="response")["val_act_ratio"] == pytest.approx(1.0)
    assert validate(model, [batch], "cpu", share_on="prompt")["val_act_ratio"] == pytest.approx(0.25)
    assert validate(model, [batch], "cpu")["val_act_ratio"] == pytest.approx((3 * 0.25 + 4) / 7)


@pytest.mark.parametrize("training", [True, False])
def test_validation_leaves_the_model_in_the_mode_it_found(training):
    """Training resumes after a validation as it was; a calibration's generation after one runs in inference."""
    model = Transformer(tiny_args()).train(training)
    tokens = torch.arange(1, 9)[None]
    batch = (torch.zeros(1), tokens, tokens, torch.ones(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))
    validate(model, [batch], "cpu")
    assert model.training is training
