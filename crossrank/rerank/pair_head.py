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
        pair_width: the size of each pair's hidden layer (``U``, ``V`` and ``W`` map to it);
            None = ``width``.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        patch_positions: int,
        gated: bool,
        pair_width: int | None = None,
    ) -> None:
        super().__init__()
        hidden = pair_width or width
        self.norm = nn.LayerNorm(width)
        self.u = nn.Linear(width, hidden)  # position i of a pair
        self.v = nn.Linear(width, hidden, bias=False)  # position j
        self.where = nn.Linear(2 * heads, hidden, bias=False)  # where i looked - where j did
        self.out = nn.Linear(hidden, 1)
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
        both = keep[:, None, :, None] & keep[:, None, None, :]  # (B, 1, n, n)
        count = both.sum(dim=(-2, -1)).to(first.dtype)  # (B, 1) real pairs
        if torch.is_grad_enabled():
            pairs = F.gelu(first.unsqueeze(-2) + second.unsqueeze(-3))  # (B, k, n, n, hidden)
            scores = self.out(pairs).squeeze(-1)  # (B, k, n, n)
            total = scores.masked_fill(~both, 0.0).sum(dim=(-2, -1))  # (B, k)
        else:
            total = self._summed(first, second, both, count)  # (B, k)
        return gate(self.gate, total / count)  # (B, k)

    def _summed(
        self, first: torch.Tensor, second: torch.Tensor, both: torch.Tensor, count: torch.Tensor
    ) -> torch.Tensor:
        """``sum over real pairs (i, j) of out(gelu(first_i + second_j))`` ``(B, k)``, a few
        candidates at a time (inference).

        ``out`` is linear, so the sum over pairs is taken first: ``out.weight · sum gelu(..) +
        pairs * out.bias``; the ``(chunk, n, n, hidden)`` pair tensor of a chunk stays in cache
        through the add, the GELU (in place) and the sum. The same arithmetic as the training
        forward up to the order of the additions.
        """
        n_batch, k, n, hidden = first.shape
        chunk = max(1, _PAIR_CHUNK_VALUES // max(1, n_batch * n * n * hidden))
        every = bool(both.all())  # one query with its padding trimmed: all pairs are real
        mask = both.to(first.dtype)  # (B, 1, n, n)
        sums = first.new_empty((n_batch, k, hidden))
        for lo in range(0, k, chunk):
            part = slice(lo, lo + chunk)
            pairs = first[:, part].unsqueeze(-2) + second[:, part].unsqueeze(-3)  # (B, c, n, n, h)
            pairs = torch.ops.aten.gelu_(pairs)
            if every:
                sums[:, part] = pairs.sum(dim=(2, 3))  # (B, c, hidden)
            else:
                sums[:, part] = torch.einsum("bcijh,bij->bch", pairs, mask[:, 0])
        return sums @ self.out.weight[0] + count * self.out.bias[0]  # (B, k)


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
