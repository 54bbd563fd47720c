"""Which blocks each token ran: the routing one generate() call recorded, as one offline HTML page.

Every prompt and generated token is shaded by the share of blocks it executed; a token x block grid
marks executed, skipped, always-on (below `dynamic_start_layer`) and reserved (the first
`dynamic_reserve_initials` positions) cells; hovering or clicking a token shows its block row.
"""
import html
import json
from dataclasses import dataclass
from typing import List

from dllm.core import flops
from dllm.core.flops import RoutingStats
from dllm.atomic_io import atomic_write_text
from dllm.core.routing import DenseRouting

# cell kinds, in the order of the legend
SKIPPED, EXECUTED, ALWAYS_ON, RESERVED = 0, 1, 2, 3
KIND_NAMES = ["skipped", "executed", "always-on block", "reserved token"]
KIND_COLORS = ["#eeeeee", "#3182bd", "#636363", "#9e58c6"]
SHADE_RGB = (49, 130, 189)  # token background: this colour at alpha = share of blocks executed


@dataclass
class SequenceRouting:
    """One row of a generate() call: its tokens as text and what each executed."""

    pieces: List[str]  # the text each token adds, prompt then output
    n_prompt: int
    kinds: List[List[int]]  # [token][block], one of the cell kinds above
    exec_ratio: float  # executed (token, block) pairs over all pairs
    kv_ratio: float  # K/V bytes kept over a dense cache's
    flops_ratio: float  # forward FLOPs over the dense model's, routers included

    @property
    def shares(self) -> List[float]:
        """Per token, the share of blocks it executed."""
        return [sum(k != SKIPPED for k in row) / len(row) for row in self.kinds]


def token_pieces(tokenizer, tokens: List[int]) -> List[str]:
    """The text each token adds to the decoded sequence (so SentencePiece spaces show); a token that
    adds none (bos, half of a UTF-8 character) shows as the vocabulary spells it."""
    pieces, before = [], ""
    for i in range(len(tokens)):
        text = tokenizer.decode(tokens[: i + 1])
        added = text[len(before):] if text.startswith(before) else text
        pieces.append(added or tokenizer.token_text(tokens[i]))
        before = text
    return pieces


def cell_kind(executed: bool, decided: bool, reserved: bool) -> int:
    if not executed:
        return SKIPPED
    if not decided:
        return ALWAYS_ON
    return RESERVED if reserved else EXECUTED


def sequences_from_generation(generator, stats: RoutingStats) -> List[SequenceRouting]:
    """Every row of a generate() call of `generator`, from the routing record it returned.

    A block is decided (not always-on) where the policy has a decision module and is not the plain
    dense one; only D-LLM reserves initial positions."""
    model = generator.model
    dense = type(model.routing) is DenseRouting
    decided = [not dense and layer.router is not None for layer in model.layers]
    n_reserved = getattr(model.routing, "reserve_initials", 0)
    out = []
    for row, tokens in enumerate(stats.tokens):
        activation = stats.activation[row, : len(tokens)]
        kinds = [[cell_kind(bool(activation[pos, block] != 0), decided[block], pos < n_reserved)
                  for block in range(stats.n_layers)] for pos in range(len(tokens))]
        out.append(SequenceRouting(
            pieces=token_pieces(generator.tokenizer, tokens), n_prompt=stats.prompt_lengths[row], kinds=kinds,
            exec_ratio=stats.exec_share(row), kv_ratio=stats.kv_bytes(row) / max(1, stats.kv_bytes_dense(row)),
            flops_ratio=flops.flops_ratio(model.params, activation[None], None, model.routing),
        ))
    return out


CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.legend span.swatch { display: inline-block; width: 1em; height: 1em; vertical-align: middle; border: 1px solid #999; }
.legend .ramp { display: inline-block; width: 10em; height: 1em; vertical-align: middle;
  background: linear-gradient(to right, rgba(%(rgb)s, 0), rgba(%(rgb)s, 1)); border: 1px solid #999; }
.seq { margin: 1.5em 0; padding-top: 0.5em; border-top: 1px solid #ccc; }
.text { font-family: monospace; line-height: 1.9; white-space: pre-wrap; }
.tok { cursor: pointer; padding: 1px 0; border-bottom: 2px solid transparent; box-shadow: inset -1px 0 0 #fff; }
.tok.gen { border-bottom-color: #e6550d; }
.tok.selected { outline: 2px solid #e6550d; }
.blockrow { margin: 0.8em 0; min-height: 2.2em; }
.blockrow .cell { display: inline-block; width: 2.2em; text-align: center; color: #fff; margin-right: 2px; }
.blockrow .cell.k0 { color: #555; }
.grid { border-collapse: collapse; margin-top: 0.5em; }
.grid td { width: 9px; height: 9px; padding: 0; border: 1px solid #fff; }
.grid th { font-weight: normal; font-size: 10px; padding-right: 4px; text-align: right; }
.grid td.hl { box-shadow: inset 0 0 0 2px #e6550d; }
%(kinds)s
""" % {
    "rgb": ", ".join(map(str, SHADE_RGB)),
    "kinds": "\n".join(f".k{k} {{ background: {c}; }}" for k, c in enumerate(KIND_COLORS)),
}

# hover previews a token's block row, click pins it; the grid column of that token is outlined
SCRIPT = """
document.querySelectorAll('.seq').forEach(function (seq) {
  var kinds = JSON.parse(seq.querySelector('script.kinds').textContent);
  var names = %(names)s;
  var row = seq.querySelector('.blockrow');
  var pinned = null;
  function show(tok) {
    var i = Number(tok.dataset.token);
    row.hidden = false;
    row.innerHTML = '<b>token ' + i + '</b> ' + tok.textContent.replace(/</g, '&lt;') + ': ';
    kinds[i].forEach(function (k, b) {
      var cell = document.createElement('span');
      cell.className = 'cell k' + k;
      cell.dataset.block = b;
      cell.dataset.kind = names[k];
      cell.title = 'block ' + b + ': ' + names[k];
      cell.textContent = b;
      row.appendChild(cell);
    });
    seq.querySelectorAll('.grid td').forEach(function (td) { td.classList.toggle('hl', Number(td.dataset.token) === i); });
  }
  seq.querySelectorAll('.tok').forEach(function (tok) {
    tok.addEventListener('mouseenter', function () { show(tok); });
    tok.addEventListener('mouseleave', function () { if (pinned) show(pinned); });
    tok.addEventListener('click', function () {
      if (pinned) pinned.classList.remove('selected');
      pinned = tok;
      tok.classList.add('selected');
      show(tok);
    });
  });
});
""" % {"names": json.dumps(KIND_NAMES)}


def _legend(n_layers: int) -> str:
    kinds = " ".join(f'<span class="swatch k{k}"></span> {name}' for k, name in enumerate(KIND_NAMES))
    return (
        '<div class="legend">'
        f'<p>Token shading: share of the {n_layers} blocks the token executed, '
        '0% <span class="ramp"></span> 100%; generated tokens are underlined in orange. '
        'Hover over a token to see its block row, click to keep it.</p>'
        f'<p>Grid (blocks down, tokens across) and block rows: {kinds}.</p></div>'
    )


def _sequence(index: int, seq: SequenceRouting) -> str:
    rgb = ", ".join(map(str, SHADE_RGB))
    tokens = "".join(
        f'<span class="tok {"prompt" if pos < seq.n_prompt else "gen"}" data-token="{pos}" data-share="{share:.6g}" '
        f'style="background-color: rgba({rgb}, {share:.6g})">{html.escape(piece.replace(chr(10), "↵" + chr(10)))}</span>'
        for pos, (piece, share) in enumerate(zip(seq.pieces, seq.shares))
    )
    n_layers = len(seq.kinds[0])
    grid = "".join(
        f"<tr><th>{block}</th>"
        + "".join(f'<td class="k{row[block]}" data-token="{pos}"></td>' for pos, row in enumerate(seq.kinds))
        + "</tr>"
        for block in range(n_layers)
    )
    summary = (
        f"{len(seq.pieces)} tokens ({seq.n_prompt} prompt, {len(seq.pieces) - seq.n_prompt} generated) | "
        f"executed: <b>{100 * seq.exec_ratio:.1f}%</b> of (token, block) pairs | "
        f"KV cache kept: <b>{100 * seq.kv_ratio:.1f}%</b> of dense | FLOPs: <b>{100 * seq.flops_ratio:.1f}%</b> of dense"
    )
    return (
        f'<section class="seq" id="seq-{index}"><h2>Sequence {index}</h2><p class="summary">{summary}</p>'
        f'<div class="text">{tokens}</div><div class="blockrow" hidden></div>'
        f'<table class="grid">{grid}</table>'
        f'<script type="application/json" class="kinds">{json.dumps(seq.kinds)}</script></section>'
    )


def render_html(sequences: List[SequenceRouting], title: str = "D-LLM: blocks executed per token") -> str:
    """One self-contained page (inline CSS and JavaScript, nothing fetched)."""
    body = "".join(_sequence(i, s) for i, s in enumerate(sequences))
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"{_legend(len(sequences[0].kinds[0]))}{body}<script>{SCRIPT}</script></body></html>\n"
    )


def write_html(sequences: List[SequenceRouting], path: str):
    atomic_write_text(render_html(sequences), path)
