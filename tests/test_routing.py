"""Each routing policy (dllm/core/routing.py): its decisions in training and inference, its own FLOPs by
hand, incremental decoding equal to teacher forcing, the evicting cache keeping only executed
pairs, its adapter restored by name; and a policy defined here, outside the model, that runs through
the unchanged block code."""
import dataclasses
import json
import math
import shutil

import pytest
import torch
from torch import nn

import finetuning
from dllm.core.objective import compute_loss
from dllm.core import flops
from dllm.core import routing
from dllm.checkpoints.adapters import adapter_state_dict, read_adapter
from dllm.checkpoints.base_model import build_model
from dllm.checkpoints import model_params
from dllm.checkpoints.meta_layout import save_meta_checkpoint
from dllm.atomic_io import atomic_save
from dllm.generation import Llama
from dllm.core.model import ModelArgs, Transformer, is_adapter_key
from dllm.core.routing import Decision, DenseRouting, DLLMRouting, FixedRouting
from dllm.training.loop import Trainer, train
from dllm.training.validation import validate
from helpers import (ROOT, SMALL_EXECUTED, make_base, make_dataset, max_diff, randomize, small_args, tiny_args,
                     train_argv)

POLICIES = ["dllm", "mod", "static", "early_exit", "dense"]
START = 1  # tiny_args' dynamic_start_layer
SKIPPED = (2, 4)  # the static policy's pruned blocks


pytestmark = pytest.mark.usefixtures("one_thread")


def policy_model(name: str, seed: int = 0, **overrides) -> Transformer:
    """A random 5-block model under policy `name`, its decision modules random enough that, at
    inference, some tokens execute each routed block and some do not."""
    torch.manual_seed(seed)
    args = tiny_args(n_layers=5, routing=name, static_skip_layers=SKIPPED, **overrides)
    model = randomize(Transformer(args), seed=seed, lora_b_std=0.1)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in model.layers:
            if layer.router is not None:
                for p in layer.router.parameters():
                    if p.ndim == 2:
                        p.copy_(3 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                    elif p is not getattr(getattr(layer.router, "norm", None), "weight", None):
                        p.zero_()
    return model


def tokens(b=2, s=14, seed=7):
    return torch.randint(3, 320, (b, s), generator=torch.Generator().manual_seed(seed))


def block_inputs(model, toks):
    """The input of every block in one inference forward (a hook per block)."""
    seen = {}
    handles = [layer.register_forward_pre_hook(lambda mod, inputs: seen.__setitem__(mod.layer_id, inputs[0]))
               for layer in model.layers]
    with torch.no_grad():
        logits, activation = model(toks)
    for h in handles:
        h.remove()
    return seen, logits, activation


# ---------------------------------------------------------------- every policy through the one code path


@pytest.mark.parametrize("name", POLICIES)
def test_incremental_decoding_equals_teacher_forcing(name):
    model = policy_model(name).eval()
    toks = tokens()
    with torch.no_grad():
        full, act_full = model(toks)
        cache = model.new_cache(2)
        parts, acts = zip(*[model(toks[:, :5], 0, cache)] + [model(toks[:, t : t + 1], t, cache) for t in range(5, toks.shape[1])])
    assert torch.equal(torch.cat(acts, 1), act_full)
    assert max_diff(torch.cat(parts, 1), full) <= 1e-5


@pytest.mark.parametrize("name", POLICIES)
def test_evicting_cache_keeps_only_executed_pairs(name):
    model = policy_model(name).eval()
    cache = model.new_cache(2)
    with torch.no_grad():
        _, activation = model(tokens(), 0, cache)
    executed = activation > 0
    routed = executed[..., START:].float().mean()
    assert (0 < routed < 1) == (name != "dense"), "a routing policy must skip some (token, block) pairs"
    assert torch.equal(cache.tokens_kept(), executed.sum(1).T.long())


def test_every_policy_is_chosen_by_name():
    for name in POLICIES:
        assert routing.make_routing(tiny_args(routing=name, n_layers=5, static_skip_layers=SKIPPED)).name == name
    with pytest.raises(routing.InputError, match="unknown routing 'skip'; known: dllm, mod, static, early_exit, dense"):
        routing.make_routing(tiny_args(routing="skip"))


# ---------------------------------------------------------------- FLOPs by hand


# SMALL_EXECUTED (tests/helpers.py): 1 sequence of 4 tokens, 3 blocks, start layer 1; its blocks and
# attention cost 15072 FLOPs, the LM head included (dim 8, router hdim 4, vocab 10)
BLOCKS_AND_HEAD = 15712 - 640


@pytest.mark.parametrize("name, cost", [
    ("dllm", 4 * 2 * 80),  # 4 tokens x 2 routed blocks x router 2 * (8 * 4 + 4 * 2)
    ("mod", 4 * 2 * (16 + 72)),  # x (score 2 * 8 * 1 + predictor 2 * (8 * 4 + 4 * 1))
    # classifier 80 at block 1 for all 4 tokens, at block 2 for the 3 that executed block 1
    ("early_exit", (4 + 3) * 80),
    ("static", 0),
    ("dense", 0),
])
def test_policy_flops_by_hand(name, cost):
    args = small_args(routing=name, static_skip_layers=(2,))
    assert flops.forward_flops(args, SMALL_EXECUTED, routing=routing.make_routing(args)) == BLOCKS_AND_HEAD + cost


# ---------------------------------------------------------------- decisions, training and inference


def test_dllm_decides_by_gumbel_in_training_and_threshold_at_inference():
    model = policy_model("dllm")
    toks = tokens()
    model.train()
    with torch.no_grad():
        _, act = model(toks)
    assert set(act.unique().tolist()) <= {0.0, 1.0} and torch.all(act[:, :2] == 1)  # hard; reserved run
    seen, _, act = block_inputs(model.eval(), toks)
    for layer in model.layers[START:]:
        prob = layer.router(seen[layer.layer_id]).softmax(-1)[..., 1]
        expected = prob >= model.routing.threshold
        expected[:, :2] = True
        assert torch.equal(act[..., layer.layer_id] > 0, expected)


def test_mod_trains_top_k_per_sequence_scaled_by_router_weight():
    model = policy_model("mod", dynamic_active_target=0.6).train()  # capacity (0.6 * 5 - 1) / 4 = 0.5
    layer = model.layers[2]
    x = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(1))
    state = {}
    decision = model.routing.decide(layer, x, torch.arange(10).expand(3, 10), state)
    scale = layer.router.scale(x)
    assert torch.equal(decision.mask.sum(1), torch.full((3,), 5))
    assert torch.equal(decision.mask, scale >= scale.topk(5, dim=1).values[:, -1:])
    assert torch.equal(decision.weight, decision.mask.float()) and torch.equal(decision.scale, scale)
    assert decision.update_weight().requires_grad
    ((logit, target),) = state["mod"]
    assert torch.equal(target, decision.mask) and logit.requires_grad


def test_mod_decides_by_the_causal_predictor_at_inference():
    model = policy_model("mod").eval()
    seen, _, act = block_inputs(model, tokens())
    for layer in model.layers[START:]:
        x = seen[layer.layer_id]
        mask = torch.sigmoid(layer.router.predict(x)) >= model.routing.threshold
        assert torch.equal(act[..., layer.layer_id], mask.float())


def test_mod_scales_the_executed_update_by_the_router_weight():
    """Packed inference honours the update weight: a block's output is x + w * (block(x) - x)."""
    model = policy_model("mod").eval()
    layer = model.layers[3]
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        out, decision = layer(x, positions, model.freqs_cis, model.routing, model.new_cache(2).layers[3])
        dense, _ = layer(x, positions, model.freqs_cis, FixedRouting({3: decision.mask}), model.new_cache(2).layers[3])
    w = decision.update_weight()[..., None]
    assert 0 < decision.mask.float().mean() < 1 and not torch.all(w[decision.mask] == 1)
    assert max_diff(out, x + w * (dense - x)) <= 1e-5


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_static_skips_its_blocks_for_every_token(train):
    model = policy_model("static").train(train)
    with torch.no_grad():
        _, act = model(tokens())
    expected = torch.ones(5)
    expected[list(SKIPPED)] = 0
    assert torch.equal(act, expected.expand_as(act))


def test_static_freezes_the_pruned_blocks_adapters():
    model = policy_model("static")
    model.set_adapter_trainable(True)
    for name, p in model.named_parameters():
        pruned = any(name.startswith(f"layers.{i}.") for i in SKIPPED)
        assert p.requires_grad == (is_adapter_key(name) and not pruned), name


def test_early_exit_stops_at_the_first_settled_block_for_good():
    model = policy_model("early_exit").eval()
    model.routing.threshold = 0.2  # rarer exits: some tokens go on to the last block
    seen, _, act = block_inputs(model, tokens())
    going = torch.ones(act.shape[:2], dtype=torch.bool)
    for layer in model.layers[START:]:
        going &= layer.router(seen[layer.layer_id]).softmax(-1)[..., 1] >= model.routing.threshold
        assert torch.equal(act[..., layer.layer_id] > 0, going)
    assert 0 < act[..., -1].mean() < act[..., START].mean(), "some tokens stop early, some later"


def test_early_exit_trains_every_block_and_its_classifiers_on_the_side():
    model = policy_model("early_exit").train()
    _, act, state = model.run(tokens())
    assert torch.all(act == 1)
    assert len(state["early_exit"]) == 5 - START
    assert all(not x.requires_grad and logits.requires_grad for x, logits in state["early_exit"])


def test_dense_routes_nothing():
    model = policy_model("dense")
    assert all(layer.router is None for layer in model.layers)
    for training in (True, False):
        with torch.no_grad():
            _, act = model.train(training)(tokens())
        assert torch.all(act == 1)


# ---------------------------------------------------------------- aux losses


def test_mod_router_learns_from_ce_and_predictor_from_its_bce():
    model = policy_model("mod").train()
    model.set_adapter_trainable(True)
    toks = tokens()
    masks = torch.ones_like(toks, dtype=torch.bool)
    c_loss, a_loss, _ = compute_loss(model, toks, toks, masks, masks)
    router = model.layers[2].router
    grads = torch.autograd.grad(c_loss, [router.linear.weight, router.predictor_1.weight], allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1] is None
    grads = torch.autograd.grad(a_loss, [router.linear.weight, router.predictor_1.weight], allow_unused=True)
    assert grads[0] is None and grads[1].abs().sum() > 0


def test_early_exit_aux_loss_by_hand():
    """Cross-entropy of each classifier against 'the head on this block's input does not yet give
    the final top-1 token', over real tokens past the reserved ones, averaged over blocks."""
    model = policy_model("early_exit").train()
    toks = tokens()
    masks = torch.ones_like(toks, dtype=torch.bool)
    masks[1, -4:] = False
    seen = {}
    handles = [layer.register_forward_pre_hook(lambda mod, inputs: seen.__setitem__(mod.layer_id, inputs[0]))
               for layer in model.layers]
    with torch.no_grad():
        _, a_loss, _ = compute_loss(model, toks, toks, masks, masks)
        logits, _ = model(toks)
    for h in handles:
        h.remove()
    weight = (masks & (torch.arange(toks.shape[1]) >= 2)).float()
    total = 0.0
    for layer in model.layers[START:]:
        x = seen[layer.layer_id]
        with torch.no_grad():
            go_on = model.project_vocab(model.norm(x)).argmax(-1) != logits.argmax(-1)
            logp = layer.router(x).log_softmax(-1)
        total += -(logp.gather(-1, go_on.long()[..., None])[..., 0] * weight).sum() / weight.sum()
    assert a_loss.item() == pytest.approx(total.item() / (5 - START), rel=1e-5)


def test_dllm_aux_loss_is_the_rate_loss_at_inference_too():
    model = policy_model("dllm").eval()
    toks = tokens()
    masks = torch.ones_like(toks, dtype=torch.bool)
    with torch.no_grad():
        _, a_loss, metrics = compute_loss(model, toks, toks, masks, masks)
        _, act = model(toks)
    ratio = act[:, 2:].mean(-1)
    assert a_loss.item() == pytest.approx((ratio - 0.5).abs().mean().item(), rel=1e-6)
    assert metrics["act_ratio"] == pytest.approx(ratio.mean().item(), rel=1e-6)


def test_dllm_sequence_rate_loss_holds_the_sequence_mean_and_lets_tokens_differ():
    activation = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [9.0, 9.0]],
                               [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])  # [b 2, s 4, layers 2]
    weight = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # the 9s are padding
    args = small_args(dynamic_active_target=0.5)
    per_token = DLLMRouting(args).aux_loss(None, {}, activation, None, weight)
    per_sequence = DLLMRouting(dataclasses.replace(args, rate_loss_unit="sequence")).aux_loss(
        None, {}, activation, None, weight)
    assert per_token.item() == pytest.approx((0.5 + 0.5 + 0 + 0.5 + 0.5) / 5)
    assert per_sequence.item() == pytest.approx((abs(0.5 - 0.5) + abs(1.0 - 0.5)) / 2)


def test_dllm_response_rate_loss_holds_response_tokens_and_leaves_the_prompt_free():
    activation = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # [b 1, s 4, layers 2]
    weight = torch.ones(1, 4)
    response = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # the last two tokens, each at share 0.5
    routing = DLLMRouting(small_args(dynamic_active_target=0.5, rate_loss_unit="response"))
    assert routing.aux_loss(None, {"response_tokens": response}, activation, None, weight).item() == 0.0
    prompt_moved = activation.clone()
    prompt_moved[0, :2] = 0.25
    assert routing.aux_loss(None, {"response_tokens": response}, prompt_moved, None, weight).item() == 0.0
    response_moved = activation.clone()
    response_moved[0, 3] = 1.0
    assert routing.aux_loss(None, {"response_tokens": response}, response_moved, None, weight).item() == pytest.approx(0.25)


def test_compute_loss_hands_the_response_tokens_to_the_rate_loss():
    model = policy_model("dllm", rate_loss_unit="response").eval()
    toks = tokens()
    masks = torch.ones_like(toks, dtype=torch.bool)
    response = torch.zeros_like(toks, dtype=torch.bool)
    response[:, -3:] = True
    with torch.no_grad():
        _, a_loss, _ = compute_loss(model, toks, toks, masks, response)
        _, act = model(toks)
    assert a_loss.item() == pytest.approx((act[:, -3:].mean(-1) - 0.5).abs().mean().item(), rel=1e-6)


# ---------------------------------------------------------------- a policy added from outside


class EveryOtherToken(DenseRouting):
    """A policy the model has never heard of: odd blocks get a one-number gate; even positions
    execute them, their update scaled by the gate's sigmoid."""

    name = "every_other"

    def block_module(self, layer_id):
        return nn.Linear(self.args.dim, 1) if layer_id % 2 else None

    def decide(self, block, x, positions, state):
        if block.router is None:
            return None
        mask = (positions % 2 == 0).expand(x.shape[:2])
        return Decision(mask.float(), mask, torch.sigmoid(block.router(x.float())[..., 0]))


def test_a_new_policy_needs_no_block_code(monkeypatch):
    """Registered by name only: its modules are adapter tensors of the blocks it chose, and the
    masked training path equals the gathered inference path, weights included."""
    monkeypatch.setitem(routing.POLICIES, "every_other", EveryOtherToken)
    torch.manual_seed(0)
    model = randomize(Transformer(tiny_args(routing="every_other")), seed=1, lora_b_std=0.1)
    adapter = {k for k in model.state_dict() if is_adapter_key(k) and ".lora_" not in k}
    assert adapter == {f"layers.{i}.router.{p}" for i in (1, 3) for p in ("weight", "bias")}
    toks = tokens()
    with torch.no_grad():
        masked, act_train = model.train()(toks)
        gathered, act_eval = model.eval()(toks)
    assert torch.equal(act_eval[..., 1], (torch.arange(toks.shape[1]) % 2 == 0).float().expand(toks.shape))
    assert torch.equal(act_train, act_eval)
    assert max_diff(masked, gathered) <= 1e-5


# ---------------------------------------------------------------- adapters restored by name


@pytest.mark.parametrize("name", POLICIES)
def test_adapter_restores_its_policy(name, tmp_path, tokenizer_path):
    model = policy_model(name).eval()
    base = tmp_path / "base"
    save_meta_checkpoint(model, str(base), dtype=torch.float32)
    shutil.copy(tokenizer_path, base / "tokenizer.model")
    atomic_save({"model": adapter_state_dict(model)}, str(tmp_path / "adapter" / "checkpoint.pth"))
    (tmp_path / "adapter" / "params.json").write_text(json.dumps(model.params.to_dict()))
    generator = Llama.build(str(base), str(tmp_path / "adapter"), max_seq_len=64, model_parallel_size=1)
    assert generator.model.routing.name == name
    toks = tokens()
    with torch.no_grad():
        expected, act = model(toks)
        got, act_loaded = generator.model(toks)
    assert torch.equal(act, act_loaded) and max_diff(expected, got) <= 1e-5


def test_params_without_routing_are_dllm_and_the_demo_adapter_keeps_its_keys():
    with open(f"{ROOT}/assets/tiny-dllm/params.json") as f:
        params = json.load(f)
    assert "routing" not in params
    args = ModelArgs.from_dict(params)
    assert args.routing == "dllm"
    model = build_model(args, f"{ROOT}/assets/tiny-llama2", f"{ROOT}/assets/tiny-dllm/checkpoint.pth")
    assert isinstance(model.routing, DLLMRouting)
    keys = {k for k in model.state_dict() if is_adapter_key(k)}
    parts = ("router.linear_1.weight", "router.linear_1.bias", "router.norm.weight", "router.linear_2.weight",
             "router.linear_2.bias")
    expected = {f"layers.{i}.{p}" for i in range(2, 8) for p in parts}
    expected |= {f"layers.{i}.attention.lora_{x}.linear_{y}.weight" for i in range(8) for x in "qkv" for y in "AB"}
    assert keys == expected


def test_mod_refuses_a_target_its_always_run_blocks_exceed():
    with pytest.raises(routing.InputError, match="choose a target above 0.200"):
        routing.make_routing(tiny_args(routing="mod", n_layers=5, dynamic_active_target=0.2))


def test_mod_capacity_meets_the_target_share_of_all_blocks():
    policy = routing.make_routing(tiny_args(routing="mod", n_layers=8, dynamic_start_layer=2, dynamic_active_target=0.5))
    assert policy.capacity == pytest.approx((0.5 * 8 - 2) / 6)
    assert math.isclose((2 + 6 * policy.capacity) / 8, 0.5)


# ---------------------------------------------------------------- fine-tuning under each policy


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer_path):
    """finetuning.py for one epoch on the tiny base (3 blocks, routed from block 1) under a policy;
    each policy's run once."""
    root = tmp_path_factory.mktemp("policies")
    base = make_base(str(root / "base"), tokenizer_path)[1]
    data = make_dataset(str(root / "data"))

    def run(name, **options):
        out = root / name
        if not out.exists():
            train(finetuning.parse_args(train_argv(base, data, str(out), routing=name, epochs=1, **options)))
        return base, out

    return run


@pytest.mark.slow
@pytest.mark.parametrize("name, options", [
    ("mod", {}), ("static", {"static_skip_layers": [2]}), ("early_exit", {}), ("dense", {}),
])
def test_finetuned_adapter_loads_as_its_policy(tiny_run, name, options):
    base, out = tiny_run(name, **options)
    assert json.loads((out / "params.json").read_text())["routing"] == name
    generator = Llama.build(base, str(out), max_seq_len=48, model_parallel_size=1)
    assert generator.model.routing.name == name
    out_tokens = generator.generate([[1, 5, 9, 12]], 4, temperature=0.0).tokens
    assert len(out_tokens[0]) <= 4


@pytest.mark.slow
def test_static_fine_tune_leaves_the_pruned_blocks_adapter_as_it_started(tiny_run):
    _, out = tiny_run("static", static_skip_layers=[2])
    saved = read_adapter(str(out / "checkpoint-last.pth"))["model"]
    for part in "qkv":
        assert torch.count_nonzero(saved[f"layers.2.attention.lora_{part}.linear_B.weight"]) == 0
        assert torch.count_nonzero(saved[f"layers.1.attention.lora_{part}.linear_B.weight"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["early_exit", "mod"])
def test_calibrated_threshold_meets_the_target(tiny_run, name):
    """The inference threshold of early exit and MoD's predictor, fit after training, gives the
    target executed share on the batches it was fit on (and the adapter's params.json keeps it)."""
    base, out = tiny_run(name)
    params = model_params.read_args(str(out / "params.json"))
    trainer = Trainer(finetuning.parse_args(train_argv(base, str(out.parent / "data"), str(out.parent / f"probe-{name}"),
                                                       routing=name, resume=str(out))))
    trainer.model.routing.threshold = params.execute_threshold
    ratio = validate(trainer.model, trainer.calibration_loader, trainer.device)["val_act_ratio"]
    assert params.execute_threshold != 0.5 and ratio == pytest.approx(params.dynamic_active_target, abs=0.02)
