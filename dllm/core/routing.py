"""Routing policies: which tokens execute which block, the model's one extension point.

A policy owns everything that differs between D-LLM and its baselines:
- the module it adds to each block (`block_module`, kept as `block.router`, so every policy's
  tensors are adapter tensors named `layers.{i}.router.*`, D-LLM's own names);
- its decision per block, in training and in inference (`decide`: a `Decision`, or None when every
  token executes);
- its auxiliary loss and that loss's weight over training (`aux_loss`, `aux_weight`);
- its own FLOPs beyond the blocks it runs (`cost`).
What must live across the blocks of one forward (early exit's stopped tokens, the pairs an
auxiliary loss is computed from) goes in the `state` dict the model hands to every `decide` of
that forward. The block has one code path acting on a Decision, so a new policy is a class here and
its name in POLICIES; `ModelArgs.routing` chooses it.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dllm.core.layers import RMSNorm, anchor_weights, linear
from dllm.errors import InputError


def rate_loss_weight(epoch: float, lambda_active: float, epochs: float) -> float:
    """lambda_t: sine-annealed from 0 at the start to lambda_active at the end of training."""
    return lambda_active * math.sin(0.5 * math.pi * min(epoch / epochs, 1.0))


class Router(nn.Module):
    """D-LLM decision module: Linear -> RMSNorm -> SiLU -> Linear(2), logits [skip, execute].

    Kept in fp32 whatever the base model's dtype, because its decisions are thresholds on small
    logit differences. With `budget_input` the budget-conditioned D-LLM's router: a learned
    embedding of the row's budget (Linear(1, hdim), zero at the start) is added to the hidden layer,
    and the budget's log-odds times a learned gain (1 at the start) to the execute logit. The shift
    makes the routers follow the budget from the first step, so training sees every budget it draws;
    the embedding alone, under the RMSNorm, barely moved the routing in an epoch (docs/dial.md).
    """

    BUDGET_CLAMP = 0.01  # budgets 0 and 1 have infinite log-odds

    def __init__(self, dim: int, hdim: int, eps: float, bias_init: Tuple[float, float], budget_input: bool = False):
        super().__init__()
        self.linear_1 = nn.Linear(dim, hdim, dtype=torch.float32)
        self.norm = RMSNorm(hdim, eps, dtype=torch.float32)
        self.linear_2 = nn.Linear(hdim, 2, dtype=torch.float32)
        with torch.no_grad():
            self.linear_2.bias.copy_(torch.tensor(bias_init, dtype=torch.float32))
        self.budget = None
        if budget_input:
            self.budget = nn.Linear(1, hdim, dtype=torch.float32)
            nn.init.zeros_(self.budget.weight)
            nn.init.zeros_(self.budget.bias)
            self.budget_gain = nn.Parameter(torch.ones(1, dtype=torch.float32))
        self._inference_terms = None  # (budget, parameter versions, terms): see budget_terms

    def forward(self, x: torch.Tensor, budget: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [b, s, dim], budget [b] or per token [b, s] (routers with a budget input) -> logits [b, s, 2]."""
        hidden = linear(x.float(), self.linear_1.weight, self.linear_1.bias)  # a decode step's few rows: the faster product
        if self.budget is None:
            return self.linear_2(F.silu(self.norm(hidden)))
        offset, shift = self.budget_terms(budget)
        return self.linear_2(F.silu(self.norm(hidden + offset))) + shift

    def budget_terms(self, budget: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """What a row's budget ([b]; per token, [b, s]) adds: to the hidden layer [b, 1 or s, hdim] and
        to the logits [b, 1 or s, 2].

        They depend on the budget and this router's weights only, so without grad (generation: the
        same budget tensor at every step) they are computed once and reused while the budget tensor
        and the weights (their version counters: an optimizer step or a load bumps them) stay the
        same, instead of eight small ops at every block of every step.
        """
        params = (self.budget.weight, self.budget.bias, self.budget_gain)
        # weights made under inference_mode count no versions (and may change in place): no reuse
        reusable = not torch.is_grad_enabled() and not any(p.is_inference() for p in params)
        versions = tuple(p._version for p in params) if reusable else None
        memo = self._inference_terms
        if reusable and memo is not None and memo[0] is budget and memo[1] == versions:
            return memo[2]
        share = budget.float()[..., None] if budget.dim() == 2 else budget.float()[:, None, None]
        offset = self.budget(share)
        shift = self.budget_gain * torch.logit(share.clamp(self.BUDGET_CLAMP, 1 - self.BUDGET_CLAMP))
        terms = offset, F.pad(shift, (1, 0))
        self._inference_terms = (budget, versions, terms) if reusable else None
        return terms


class BudgetRouters(nn.Module):
    """A budget-conditioned D-LLM's routers of one block when `dynamic_budget_routers` > 1: that many
    Routers (budget input and all) at evenly spaced anchors over the trained range, a row's logits the
    blend of the two anchors around its budget (linear weights; a budget outside the range takes the
    nearest end's router). Each router so learns from the budgets near its anchor: with one router
    for the whole range, the rate loss that holds the low budgets moves the routing at the high ones
    too (docs/dial.md)."""

    def __init__(self, dim: int, hdim: int, eps: float, bias_init: Tuple[float, float],
                 budget_range: Tuple[float, float], n_routers: int):
        super().__init__()
        self.routers = nn.ModuleList(Router(dim, hdim, eps, bias_init, budget_input=True) for _ in range(n_routers))
        self.budget_range = tuple(budget_range)

    def weights(self, budget: torch.Tensor) -> torch.Tensor:
        """budget [b] or [b, s] -> each router's weight [b, 1 or s, n_routers], summing to 1."""
        return anchor_weights(budget if budget.dim() == 2 else budget[:, None], self.budget_range, len(self.routers))

    def forward(self, x: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        weights = self.weights(budget)
        return sum(weights[..., k, None] * router(x, budget) for k, router in enumerate(self.routers))


def router_from_start_layer(args, layer_id: int, budget_input: bool = False) -> Optional[nn.Module]:
    """D-LLM's decision module in every block from `dynamic_start_layer` on (early exit reuses it)."""
    if layer_id < args.dynamic_start_layer:
        return None
    if budget_input and args.dynamic_budget_routers > 1:
        return BudgetRouters(args.dim, args.dynamic_router_hdim, args.norm_eps, args.dynamic_router_bias,
                             args.dynamic_budget_range, args.dynamic_budget_routers)
    return Router(args.dim, args.dynamic_router_hdim, args.norm_eps, args.dynamic_router_bias, budget_input)


@dataclass
class MarginDial:
    """A D-LLM adapter's compute dial (calibrated by dllm/dial.py, saved beside the adapter): for each
    budget of a grid, per block the execute margin (execute logit - skip logit) at or above which a
    token runs it, so that the share of blocks executed meets the budget. A budget-conditioned
    adapter's dial may instead tell its routers another budget (`inputs`, an input dial) and keep their
    own rule (margin >= 0; `thresholds` then unused): the routing moves along the budget input rather
    than past it. An input dial calibrated per phase also has `prompt_inputs`, told on prompt tokens,
    `inputs` then on the response's (the tokens a generation decodes; a forward that marks no
    tokens, state "response_tokens", is all response): prompt and answer route differently, so one
    input per budget meets it on the prompt or on the answer, not on both. A budget between two grid
    points takes the linear interpolation of their values; a budget of 1 runs every block."""

    budgets: torch.Tensor  # [K] increasing shares of all blocks
    thresholds: torch.Tensor  # [K, n_layers] margin thresholds (unrouted blocks: unused)
    inputs: Optional[torch.Tensor] = None  # [K] the budget the routers are told at each grid budget
    prompt_inputs: Optional[torch.Tensor] = None  # [K] the same on prompt tokens, for a dial per phase

    @property
    def budget_range(self) -> Tuple[float, float]:
        return float(self.budgets[0]), float(self.budgets[-1])

    def row_thresholds(self, budget: torch.Tensor, layer_id: int) -> torch.Tensor:
        """budget [b] -> the margin threshold of each row at block `layer_id`, [b]."""
        return self.interpolate(budget, self.thresholds[:, layer_id])

    def row_inputs(self, budget: torch.Tensor) -> torch.Tensor:
        """budget [b] -> the budget each row's routers are told, [b] (an input dial)."""
        return self.interpolate(budget, self.inputs)

    def token_inputs(self, budget: torch.Tensor, response_tokens: torch.Tensor) -> torch.Tensor:
        """budget [b], response_tokens [b, s] -> the budget each token's routers are told, [b, s] (a dial per phase)."""
        prompt = self.interpolate(budget, self.prompt_inputs)
        return torch.where(response_tokens.bool(), self.row_inputs(budget)[:, None], prompt[:, None])

    def interpolate(self, budget: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        budgets, values = self.budgets.to(budget.device), values.to(budget.device)
        if len(budgets) == 1:
            return values.expand_as(budget)
        high = torch.searchsorted(budgets, budget.float()).clamp(1, len(budgets) - 1)
        low = high - 1
        weight = ((budget.float() - budgets[low]) / (budgets[high] - budgets[low])).clamp(0, 1)
        return values[low] + weight * (values[high] - values[low])


def mlp_flops(*widths: int) -> int:
    """FLOPs per token of a chain of linear layers widths[0] -> widths[1] -> ... (2 per multiply-add)."""
    return 2 * sum(a * b for a, b in zip(widths, widths[1:]))


@dataclass
class Decision:
    """Per-token routing of one block.

    weight: [b, s] float execute weight, 1 = execute, 0 = skip; in training it may carry the
            router's straight-through gradient (D-LLM). It is what the model reports per token and
            block, what FLOPs, KV and the rate loss count.
    mask:   [b, s] bool, the tokens that execute (and so keep K/V at this block).
    scale:  [b, s] float or None, a factor on the executed tokens' update (MoD's router weight).
    The block's output is u * block(x) + (1 - u) * x with u = weight * scale (`update_weight`).
    """

    weight: torch.Tensor
    mask: torch.Tensor
    scale: Optional[torch.Tensor] = None

    def update_weight(self) -> torch.Tensor:
        return self.weight if self.scale is None else self.weight * self.scale


class DenseRouting:
    """Every token executes every block: the plain Llama model.

    Also the interface: every policy subclasses it and overrides what it does; these defaults add,
    decide, train and cost nothing.
    """

    name = "dense"
    label = "dense LoRA"
    # True: the inference threshold is fit after training so the executed share meets the target
    calibrates_threshold = False
    # the inference threshold of a policy that decides by one (D-LLM, MoD, early exit): set from
    # execute_threshold when built, and by calibration (training.validation.calibrate_threshold)
    threshold: Optional[float] = None

    def __init__(self, args=None):
        self.args = args

    def block_module(self, layer_id: int) -> Optional[nn.Module]:
        """The module this policy adds to block `layer_id` (its `router`), or None."""
        return None

    def decide(self, block, x: torch.Tensor, positions: torch.Tensor, state: dict) -> Optional[Decision]:
        return None

    def lora_anchors(self, x: torch.Tensor, state: dict, training: bool) -> Optional[torch.Tensor]:
        """A budget-conditioned LoRA's weight on each budget's gains (layers.LoRA.gate), per token
        [b, s, budget_gates]; None: no such LoRA."""
        return None

    def check_budget(self, budgets: Sequence[float]):
        """A budget (share of blocks to execute) this policy cannot meet: one InputError line."""
        raise InputError(f"--budget {budgets[0]}: routing {self.name!r} ({self.label}) takes no budget; only D-LLM "
                         f"adapters do")

    def always_skips(self, layer_id: int) -> bool:
        """A block no token ever executes: its adapter tensors would get no gradient, so they are frozen."""
        return False

    def aux_loss(self, model, state: dict, activation: torch.Tensor, hidden: torch.Tensor,
                 token_weight: torch.Tensor) -> torch.Tensor:
        """The training loss besides CE; activation [b, s, n_layers] execute weights, hidden [b, s,
        dim] what the output projection reads (the final norm's output), token_weight [b, s] 1 on
        real tokens past the reserved initial ones."""
        return activation.new_zeros(())

    def aux_weight(self, progress: float, lambda_active: float, epochs: float) -> float:
        """The aux loss's weight at `progress` (fractional epochs)."""
        return 0.0

    def cost(self, executed: torch.Tensor, token_mask: torch.Tensor) -> float:
        """FLOPs the policy spends itself (routers, predictors, classifiers); executed [b, T,
        n_layers] 0/1 with padding zeroed, token_mask [b, T]."""
        return 0.0


class DLLMRouting(DenseRouting):
    """D-LLM: a Router in every block from dynamic_start_layer on; straight-through hard
    Gumbel-softmax in training, p(execute) >= threshold at inference.

    The first `dynamic_reserve_initials` positions of every sequence always execute (attention
    sinks). The aux loss is the rate loss |share of blocks executed - target| per token, weighted
    by the sine-annealed lambda_t; with `rate_loss_unit` "sequence" it is |mean share over the
    sequence's tokens - target| per sequence instead, which leaves the tokens of one sequence free
    to differ, and with "response" it is the per-token loss over response tokens only, the ones the
    CE scores and a user's decode pays for: prompt tokens route freely (both ours: the reference
    pulls every token to the target). With `rate_loss_gap` "relative" (ours) the gap is divided by
    the target: a budget-conditioned adapter's sequences drawn at low budgets are held to theirs as
    tightly, in proportion, as those at high ones (an absolute gap lets a low target run well over it).

    Budgets (ours): with `dynamic_budget_range` (low, high) the routers take the row's budget as an
    input, and training draws a target per sequence uniformly from the range, the rate loss holding
    each sequence to its own; at inference a row's budget is what it asks (`forward(budget=)`), else
    `budget` (Llama.build), else dynamic_active_target. Any D-LLM adapter meets a budget exactly
    through its `dial` (a MarginDial calibrated beside it), which takes over from the threshold.
    """

    name = "dllm"
    label = "D-LLM"
    RATE_LOSS_UNITS = ("token", "sequence", "response")
    RATE_LOSS_GAPS = ("absolute", "relative")

    def __init__(self, args):
        super().__init__(args)
        if args.rate_loss_unit not in self.RATE_LOSS_UNITS:
            raise InputError(f"rate_loss_unit {args.rate_loss_unit!r}: must be one of {', '.join(self.RATE_LOSS_UNITS)}")
        if args.rate_loss_gap not in self.RATE_LOSS_GAPS:
            raise InputError(f"rate_loss_gap {args.rate_loss_gap!r}: must be one of {', '.join(self.RATE_LOSS_GAPS)}")
        self.reserve_initials = args.dynamic_reserve_initials
        self.tau = args.gumbel_tau
        self.threshold = args.execute_threshold
        self.trained_range = tuple(args.dynamic_budget_range) or None
        if self.trained_range is not None:
            if len(self.trained_range) != 2 or not 0 < self.trained_range[0] < self.trained_range[1] <= 1:
                raise InputError(f"dynamic_budget_range {list(self.trained_range)}: must be [low, high] with "
                                 f"0 < low < high <= 1")
            if not self.trained_range[0] <= args.dynamic_active_target <= self.trained_range[1]:
                raise InputError(f"dynamic_active_target {args.dynamic_active_target} (the budget when none is "
                                 f"asked): must lie in dynamic_budget_range {list(self.trained_range)}")
        if args.dynamic_budget_routers < 1 or (args.dynamic_budget_routers > 1 and self.trained_range is None):
            raise InputError(f"dynamic_budget_routers {args.dynamic_budget_routers}: must be 1, or more for a "
                             f"budget-conditioned D-LLM (dynamic_budget_range)")
        if args.dynamic_budget_draw_power <= 0 or (args.dynamic_budget_draw_power != 1 and self.trained_range is None):
            raise InputError(f"dynamic_budget_draw_power {args.dynamic_budget_draw_power}: must be 1, or above 0 for a "
                             f"budget-conditioned D-LLM (dynamic_budget_range)")
        if args.dynamic_budget_lora and (args.dynamic_budget_lora < 2 or self.trained_range is None or not args.lora_rank):
            raise InputError(f"dynamic_budget_lora {args.dynamic_budget_lora}: must be 0, or 2 or more for a "
                             f"budget-conditioned D-LLM (dynamic_budget_range) with a LoRA")
        self.budget: Optional[float] = None
        self.dial: Optional[MarginDial] = None
        self._asked_budget = None  # ((budget, rows, device), that budget per row)
        self._told_budget = None  # (asked budget tensor, dial, what the dial tells the routers for it)

    def block_module(self, layer_id: int) -> Optional[nn.Module]:
        return router_from_start_layer(self.args, layer_id, budget_input=self.trained_range is not None)

    def budget_range(self) -> Optional[Tuple[float, float]]:
        """The budgets this adapter meets: those it was trained for, within those its dial is calibrated for."""
        ranges = [r for r in (self.trained_range, self.dial and self.dial.budget_range) if r]
        if not ranges:
            return None
        return max(r[0] for r in ranges), min(r[1] for r in ranges)

    def check_budget(self, budgets):
        met = self.budget_range()
        if met is None:
            raise InputError(f"--budget {budgets[0]}: this D-LLM adapter was trained for one target "
                             f"({self.args.dynamic_active_target}) and has no calibrated dial; build one with "
                             f"python -m tools.calibrate_dial")
        outside = [b for b in budgets if not met[0] - 1e-6 <= b <= met[1] + 1e-6]  # float32 grid
        if outside:
            what = "calibrated" if self.dial is not None else "trained"
            raise InputError(f"--budget {outside[0]}: this adapter was {what} for budgets {met[0]:.2f} to {met[1]:.2f}")

    def row_budget(self, x: torch.Tensor, state: dict, training: bool) -> Optional[torch.Tensor]:
        """The budget of each row in this forward, [b], or None (the adapter routes as trained);
        training draws it per sequence from the trained range (uniformly, or skewed to its low end by
        dynamic_budget_draw_power). Kept in `state` for the later blocks
        and the rate loss."""
        if "budget" not in state:
            if self.trained_range is not None and training:
                low, high = self.trained_range
                draw = torch.rand(x.shape[0], device=x.device) ** self.args.dynamic_budget_draw_power
                state["budget"] = low + (high - low) * draw
            elif self.budget is not None or self.trained_range is not None:
                asked = self.args.dynamic_active_target if self.budget is None else self.budget
                key = (asked, x.shape[0], x.device)
                # one tensor while the budget stands, so the routers reuse their budget_terms; fresh
                # with grad, where a tensor made under inference_mode could not be used
                if torch.is_grad_enabled() or self._asked_budget is None or self._asked_budget[0] != key:
                    self._asked_budget = key, torch.full((x.shape[0],), asked, device=x.device)
                state["budget"] = self._asked_budget[1]
            else:
                return None
        return state["budget"]

    def told_budget(self, budget: Optional[torch.Tensor], response_tokens: Optional[torch.Tensor] = None
                    ) -> Optional[torch.Tensor]:
        """What an input dial tells the routers for the rows' asked budget (else the asked one): one
        tensor per asked tensor and dial, so a generation's decode steps reuse it and the routers their
        budget_terms; fresh with grad, as row_budget. A dial per phase tells each token its phase's
        input where the forward marks its response tokens [b, s] (a prefill, a scored record)."""
        if budget is None or self.dial is None or self.dial.inputs is None:
            return budget
        if response_tokens is not None and self.dial.prompt_inputs is not None:
            return self.dial.token_inputs(budget, response_tokens)
        if torch.is_grad_enabled():
            return self.dial.row_inputs(budget)
        if self._told_budget is None or self._told_budget[0] is not budget or self._told_budget[1] is not self.dial:
            self._told_budget = budget, self.dial, self.dial.row_inputs(budget)
        return self._told_budget[2]

    def routers_budget(self, budget: Optional[torch.Tensor], state: dict, training: bool) -> Optional[torch.Tensor]:
        """What the routers are told: in training the drawn budget, else what the dial tells them for
        the asked one (told_budget), worked out once per forward: every block is told the same."""
        if training:
            return budget
        if "told_budget" not in state:
            state["told_budget"] = self.told_budget(budget, state.get("response_tokens"))
        return state["told_budget"]

    def lora_anchors(self, x, state, training):
        """A budget-conditioned LoRA (dynamic_budget_lora) is told what the routers are; worked out
        once per forward, as every block's LoRAs are told the same."""
        if not self.args.dynamic_budget_lora:
            return None
        if "lora_anchors" not in state:
            told = self.routers_budget(self.row_budget(x, state, training), state, training)
            anchors = anchor_weights(told, self.trained_range, self.args.dynamic_budget_lora)
            b, s = x.shape[:2]
            state["lora_anchors"] = anchors[:, None].expand(b, s, -1) if told.dim() == 1 else anchors
        return state["lora_anchors"]

    def decide(self, block, x, positions, state) -> Optional[Decision]:
        router = block.router
        if router is None:
            return None
        budget = self.row_budget(x, state, router.training)
        logits = router(x, self.routers_budget(budget, state, router.training))
        reserved = (positions < self.reserve_initials).expand(logits.shape[:2])
        if router.training:
            weight = F.gumbel_softmax(logits, tau=self.tau, hard=True)[..., 1]
            weight = torch.where(reserved, torch.ones_like(weight), weight)
            mask = weight > 0.5
            return Decision(weight, mask)
        if self.dial is not None and budget is not None:
            margin = logits[..., 1] - logits[..., 0]
            # an input dial keeps the routers' own rule, margin >= 0
            threshold = 0.0 if self.dial.inputs is not None else self.dial.row_thresholds(budget, block.layer_id)[:, None]
            mask = (margin >= threshold) | (budget[:, None] >= 1) | reserved
        else:
            prob = logits.softmax(-1)[..., 1]
            mask = (prob >= self.threshold) | reserved
        return Decision(mask.float(), mask)

    def aux_loss(self, model, state, activation, hidden, token_weight) -> torch.Tensor:
        ratio = activation.mean(-1)
        target = self.args.dynamic_active_target
        if "budget" in state:
            target = state["budget"].to(ratio.dtype)
        if self.args.rate_loss_unit == "response":
            token_weight = token_weight * state["response_tokens"]
        if self.args.rate_loss_unit == "sequence":
            counts = token_weight.sum(-1)
            gap = self.gap((ratio * token_weight).sum(-1) / counts.clamp(min=1), target)
            return (gap * (counts > 0)).sum() / (counts > 0).sum().clamp(min=1)
        if "budget" in state:
            target = target[:, None]
        return (self.gap(ratio, target) * token_weight).sum() / token_weight.sum().clamp(min=1)

    def gap(self, share: torch.Tensor, target) -> torch.Tensor:
        """How far a share is from its target, as the rate loss counts it (rate_loss_gap)."""
        gap = (share - target).abs()
        return gap / target if self.args.rate_loss_gap == "relative" else gap

    def aux_weight(self, progress, lambda_active, epochs) -> float:
        return rate_loss_weight(progress, lambda_active, epochs)

    def cost(self, executed, token_mask) -> float:
        """The router(s) of every routed block, for every token; and a budget-conditioned LoRA, never
        merged, in every block a token executes."""
        a = self.args
        n_routed = max(0, executed.shape[2] - a.dynamic_start_layer)
        routers = a.dynamic_budget_routers if self.trained_range is not None else 1
        total = token_mask.sum().item() * n_routed * routers * mlp_flops(a.dim, a.dynamic_router_hdim, 2)
        if a.dynamic_budget_lora:
            lora = mlp_flops(a.dim, a.lora_rank, a.q_width) + 2 * mlp_flops(a.dim, a.lora_rank, a.kv_width)
            total += executed.sum().item() * lora
        return total


class MoDRouter(nn.Module):
    """MoD's decision module, fp32 like Router.

    `linear` scores each token: the top-k execute in training, and 2 * sigmoid(score) scales the
    executed tokens' update. `predictor_1/2` is the causal predictor, a small MLP on the detached input
    trained to say whether the token is in the top-k; it decides at inference, where top-k over a
    sequence is not causal.
    """

    def __init__(self, dim: int, hdim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 1, dtype=torch.float32)
        self.predictor_1 = nn.Linear(dim, hdim, dtype=torch.float32)
        self.predictor_2 = nn.Linear(hdim, 1, dtype=torch.float32)
        with torch.no_grad():  # small scores: the scale starts near 1, the frozen block's own update
            nn.init.normal_(self.linear.weight, std=1.0 / dim)
            self.linear.bias.zero_()

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(self.linear(x.float()).squeeze(-1))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The predictor's logit that the token is in its block's top-k."""
        return self.predictor_2(F.silu(self.predictor_1(x.float()))).squeeze(-1)


class MoDRouting(DenseRouting):
    """Mixture-of-Depths (Raposo et al. 2024) on the blocks from dynamic_start_layer on.

    Training: per sequence and block the k tokens with the highest router score execute, k =
    capacity x length, with the capacity set so that the share of all blocks executed is
    dynamic_active_target (the blocks below the start always run); the router weight scales the
    executed tokens' update, which is how the router learns. Inference: the causal predictor decides
    (sigmoid >= threshold), the update scaled the same way. The aux loss is the predictor's binary
    cross-entropy against top-k membership. Choices: the threshold is fit after training so the
    executed share meets the target (`calibrates_threshold`: the predictor's 0.5 misses the target,
    so matched compute needs it); the router weight is 2 * sigmoid(score), not
    MoD's raw score, which from a pretrained base would start near 0 and erase the frozen blocks;
    k counts the batch's padded length; no reserved initial tokens (MoD has none).
    """

    name = "mod"
    label = "MoD"
    calibrates_threshold = True

    def __init__(self, args):
        super().__init__(args)
        routed = args.n_layers - args.dynamic_start_layer
        self.capacity = (args.dynamic_active_target * args.n_layers - args.dynamic_start_layer) / max(routed, 1)
        if routed <= 0 or not 0 < self.capacity <= 1:
            raise InputError(
                f"MoD: dynamic_active_target {args.dynamic_active_target} with {args.dynamic_start_layer} of "
                f"{args.n_layers} blocks always run leaves a capacity of {self.capacity:.3f} for the routed "
                f"blocks; choose a target above {args.dynamic_start_layer / args.n_layers:.3f}"
            )
        self.threshold = args.execute_threshold

    def block_module(self, layer_id: int) -> Optional[nn.Module]:
        if layer_id < self.args.dynamic_start_layer:
            return None
        return MoDRouter(self.args.dim, self.args.dynamic_router_hdim)

    def decide(self, block, x, positions, state) -> Optional[Decision]:
        router = block.router
        if router is None:
            return None
        scale = router.scale(x)
        if router.training:
            k = max(1, round(self.capacity * x.shape[1]))
            mask = torch.zeros_like(scale, dtype=torch.bool).scatter_(1, scale.topk(k, dim=1).indices, True)
            state.setdefault("mod", []).append((router.predict(x.detach()), mask))
        else:
            mask = torch.sigmoid(router.predict(x)) >= self.threshold
        return Decision(mask.float(), mask, scale)

    def aux_loss(self, model, state, activation, hidden, token_weight) -> torch.Tensor:
        pairs = state.get("mod", [])
        if not pairs:
            return activation.new_zeros(())
        bce = sum((F.binary_cross_entropy_with_logits(logit, target.float(), reduction="none") * token_weight).sum()
                  for logit, target in pairs)
        return bce / (len(pairs) * token_weight.sum().clamp(min=1))

    def aux_weight(self, progress, lambda_active, epochs) -> float:
        return 1.0  # it trains only the predictor (detached input), so a schedule would only slow it

    def cost(self, executed, token_mask) -> float:
        """The router score and the predictor of every routed block, for every token."""
        a = self.args
        n_routed = max(0, executed.shape[2] - a.dynamic_start_layer)
        per_block = mlp_flops(a.dim, 1) + mlp_flops(a.dim, a.dynamic_router_hdim, 1)
        return token_mask.sum().item() * n_routed * per_block


class StaticRouting(DenseRouting):
    """Static block pruning (Shortened-LLaMA, Kim et al. 2024): every token skips the blocks in
    static_skip_layers, in training and at inference (so they keep no K/V); the rest always run.
    tools/rank_blocks.py ranks the blocks (perplexity increase when removed, Taylor importance)."""

    name = "static"
    label = "static pruning"

    def __init__(self, args):
        super().__init__(args)
        self.skipped = frozenset(args.static_skip_layers)
        bad = sorted(i for i in self.skipped if not 0 <= i < args.n_layers)
        if bad:
            raise InputError(f"static_skip_layers {bad}: the model has blocks 0..{args.n_layers - 1}")

    def decide(self, block, x, positions, state) -> Optional[Decision]:
        if block.layer_id not in self.skipped:
            return None
        mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        return Decision(mask.float(), mask)

    def check_budget(self, budgets: Sequence[float]):
        """A budget (share of blocks to execute) this policy cannot meet: one InputError line."""
        raise InputError(f"--budget {budgets[0]}: routing {self.name!r} ({self.label}) takes no budget; only D-LLM "
                         f"adapters do")

    def always_skips(self, layer_id: int) -> bool:
        return layer_id in self.skipped


class EarlyExitRouting(DenseRouting):
    """Early exit, Ada-Infer-style (Fan et al. 2024): from dynamic_start_layer on, a classifier on
    each block's input says whether the token's prediction has settled; if so the token stops
    there, skipping that block and every later one (leaving no K/V), and the head reads its hidden
    state as it is.

    Training runs every block (Ada-Infer leaves the model as it is; LoRA trains as in the dense
    fine-tune) and trains the classifiers on the side (detached inputs): at each block the label is
    whether the head applied to that block's input already gives the final top-1 token. The
    threshold on p(execute) is fit after training so the executed share meets
    dynamic_active_target (`calibrates_threshold`). Choice: the classifier is D-LLM's Router on the
    hidden state, not Ada-Infer's SVM on LM-head features (gap, top prob): the head at every block
    would cost more than a block on small models.
    """

    name = "early_exit"
    label = "early exit"
    calibrates_threshold = True

    def __init__(self, args):
        super().__init__(args)
        self.threshold = args.execute_threshold

    @staticmethod
    def settled(model, x: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """Whether the head on hidden states x already gives the final top-1 tokens: the classifiers' label."""
        return model.project_vocab(model.norm(x)).argmax(-1) == final

    def block_module(self, layer_id: int) -> Optional[nn.Module]:
        return router_from_start_layer(self.args, layer_id)

    def decide(self, block, x, positions, state) -> Optional[Decision]:
        router = block.router
        if router is None:
            return None
        if router.training:
            state.setdefault("early_exit", []).append((x.detach(), router(x.detach())))
            return None
        stopped = router(x).softmax(-1)[..., 1] < self.threshold
        if "stopped" in state:
            stopped = stopped | state["stopped"]
        state["stopped"] = stopped
        return Decision((~stopped).float(), ~stopped)

    def aux_loss(self, model, state, activation, hidden, token_weight) -> torch.Tensor:
        pairs = state.get("early_exit", [])
        if not pairs:
            return activation.new_zeros(())
        counted = token_weight > 0  # the head at every block costs more than the model: only where it counts
        weight = token_weight[counted]
        with torch.no_grad():
            final = model.project_vocab(hidden[counted]).argmax(-1)
        total = 0.0
        for x, router_logits in pairs:
            with torch.no_grad():
                go_on = ~self.settled(model, x[counted], final)
            ce = F.cross_entropy(router_logits[counted], go_on.long(), reduction="none")
            total = total + (ce * weight).sum()
        return total / (len(pairs) * weight.sum().clamp(min=1))

    def aux_weight(self, progress, lambda_active, epochs) -> float:
        return 1.0  # it trains only the classifiers (detached inputs), so a schedule would only slow them

    def cost(self, executed, token_mask) -> float:
        """The classifier at each routed block a token reaches: every token reaches the first one,
        and block l > start if it executed block l - 1."""
        a = self.args
        if executed.shape[2] <= a.dynamic_start_layer:
            return 0.0
        evaluations = token_mask.sum().item() + executed[..., a.dynamic_start_layer : -1].sum().item()
        return evaluations * mlp_flops(a.dim, a.dynamic_router_hdim, 2)


class FixedRouting(DenseRouting):
    """Decisions given from outside, per layer ([b, s] bool masks): for tests and ablations."""

    def __init__(self, masks: dict):
        super().__init__()
        self.masks = masks

    def decide(self, block, x, positions, state) -> Optional[Decision]:
        mask = self.masks.get(block.layer_id)
        if mask is None:
            return None
        mask = mask.to(x.device)
        return Decision(mask.float(), mask)


POLICIES = {policy.name: policy for policy in (DLLMRouting, MoDRouting, StaticRouting, EarlyExitRouting, DenseRouting)}

def make_routing(args) -> DenseRouting:
    """The policy `args.routing` names, built from the model args."""
    if args.routing not in POLICIES:
        raise InputError(f"unknown routing {args.routing!r}; known: {', '.join(POLICIES)}")
    return POLICIES[args.routing](args)
