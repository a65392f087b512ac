"""The pair head of the cross-attention reranker: a direct path from "where is each object" to
the score.

Every pair of query positions ``(i, j)`` is scored from their final states and the difference of
where they looked in the last layer (attention-weighted patch coordinates on the square
``patch_positions`` grid); the mean over pairs of real positions is added to the logit
(``RerankerConfig.pair_head``). Relations such as "left of" then need no MLP to compare two
positions' attention maps.
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F
from torch import nn

from crossrank.rerank.layers import gate

__all__ = ["PairHead", "keep_flat_keys"]

#: Values of the pair head's ``(chunk, n, n, width)`` tensor per inference chunk (2 MB of fp32).
_PAIR_CHUNK_VALUES = 1 << 19


class PairHead(nn.Module):
    """``mean over real pairs (i, j) of out(gelu(U y_i + V y_j + W (where_i - where_j)))``.

    ``y = LN(x)``; ``where`` is what each head's attention averaged of the patch coordinates
    :attr:`coords` in the last layer. With ``gated`` the term is multiplied by ``tanh(gate)``,
    initialised at 0.

    Args:
        width: the reranker's width.
        heads: its attention heads (each contributes an (x, y) to ``where``).
        patch_positions: patch slots, a square number (``side * side``).
        gated: whether a tanh gate scales the term.
    """

    def __init__(self, width: int, heads: int, patch_positions: int, gated: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.u = nn.Linear(width, width)  # position i of a pair
        self.v = nn.Linear(width, width, bias=False)  # position j
        self.where = nn.Linear(2 * heads, width, bias=False)  # where i looked - where j did
        self.out = nn.Linear(width, 1)
        self.gate = nn.Parameter(torch.zeros(1)) if gated else None
        # Each patch slot's (column, row) on the square grid, in [-1, 1]; not module state.
        side = round(patch_positions**0.5)
        grid = torch.arange(patch_positions)
        coords = torch.stack([grid % side, grid // side], dim=-1).float()  # (patch_positions, 2)
        self.register_buffer("coords", coords * (2 / max(side - 1, 1)) - 1, persistent=False)

    def forward(self, x: torch.Tensor, looked: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The pair term of each candidate's logit.

        Args:
            x: ``(B, k, n, width)`` final query-side states (float32).
            looked: ``(B, k, n, heads, 2)`` the last layer's attention-weighted :attr:`coords`.
            keep: ``(B, n)`` bool, True = a real position.

        Returns:
            ``(B, k)``, gated.
        """
        where = looked.flatten(-2).float()  # (B, k, n, 2 * heads)
        y = self.norm(x)  # (B, k, n, width)
        moved = self.where(where)  # (B, k, n, width); linear, so W(w_i - w_j) = Ww_i - Ww_j
        first, second = self.u(y) + moved, self.v(y) - moved  # (B, k, n, width) each
        if torch.is_grad_enabled():
            pairs = F.gelu(first.unsqueeze(-2) + second.unsqueeze(-3))  # (B, k, n, n, width)
            scores = self.out(pairs).squeeze(-1)  # (B, k, n, n)
        else:
            scores = self._chunked_scores(first, second)  # (B, k, n, n)
        both = keep[:, None, :, None] & keep[:, None, None, :]  # (B, 1, n, n)
        total = scores.masked_fill(~both, 0.0).sum(dim=(-2, -1))  # (B, k)
        return gate(self.gate, total / both.sum(dim=(-2, -1)).to(scores.dtype))  # (B, k)

    def _chunked_scores(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """``out(gelu(first_i + second_j))`` ``(B, k, n, n)`` a few candidates at a time.

        Without autograd the ``(n, n, width)`` pair tensor of a chunk then stays in cache through
        the add, the GELU (in place) and the output map; the same arithmetic. Measured on the
        2-core CPU (an interleaved A/B of the chunked and unchunked versions): within noise at
        k = 100 when idle, 217 against 280 ms at k = 1000 under load.
        """
        n_batch, k, n, width = first.shape
        chunk = max(1, _PAIR_CHUNK_VALUES // max(1, n_batch * n * n * width))
        scores = first.new_empty((n_batch, k, n, n))
        for lo in range(0, k, chunk):
            part = slice(lo, lo + chunk)
            pairs = first[:, part].unsqueeze(-2) + second[:, part].unsqueeze(-3)  # (B, c, n, n, w)
            scores[:, part] = self.out(torch.ops.aten.gelu_(pairs)).squeeze(-1)  # (B, c, n, n)
        return scores


def keep_flat_keys(parent: nn.Module, child: str) -> None:
    """Save ``parent.<child>``'s entries as ``<child>_<name>`` and load them back from there.

    The pair head's weights sat on the reranker itself (``pair_norm.weight``, ``pair_u.weight``,
    ..., ``pair_gate``) before it became its own module: saved checkpoints keep those names.
    ``parent.state_dict()`` writes them; ``parent.load_state_dict()`` reads them (strict too).
    """
    parent.register_state_dict_post_hook(functools.partial(_save_flat, child=child))
    parent.register_load_state_dict_pre_hook(functools.partial(_load_flat, child=child))
    parent.register_load_state_dict_post_hook(functools.partial(_report_flat, child=child))


def _save_flat(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *, child: str
) -> None:
    nested, flat = f"{prefix}{child}.", f"{prefix}{child}_"
    if not any(key.startswith(nested) for key in state_dict):
        return
    items = [
        (flat + key[len(nested) :] if key.startswith(nested) else key, value)
        for key, value in state_dict.items()
    ]
    state_dict.clear()  # in place, in order: the dict may hold a containing module's entries too
    state_dict.update(items)


def _load_flat(module: nn.Module, state_dict: dict, prefix: str, *args: object, child: str) -> None:
    nested, flat = f"{prefix}{child}.", f"{prefix}{child}_"
    for key in [key for key in state_dict if key.startswith(flat)]:
        state_dict[nested + key[len(flat) :]] = state_dict.pop(key)


def _report_flat(module: nn.Module, incompatible: object, *, child: str) -> None:
    """Missing or unexpected keys are reported under the names a checkpoint has."""
    pattern = re.compile(rf"(^|\.){re.escape(child)}\.")
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [pattern.sub(rf"\g<1>{child}_", key, count=1) for key in keys]
