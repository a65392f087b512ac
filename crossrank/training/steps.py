"""The batched forwards of reranker training and its validation.

Training gathers every step's features from :class:`Banks` (the training set's token and patch
features on the training device) by row; :func:`_forward` scores each caption's image candidate
list, :func:`forward_captions` each image's caption list (the true caption and its rewrites),
and :func:`_validate` computes the learning-curve metrics on the held-out captions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch

    from crossrank.rerank.cross_attention import CrossAttentionReranker
    from crossrank.training.data import TrainingSet

__all__ = ["Banks", "forward_captions", "top1_accuracy"]

_EVAL_CANDIDATES = 1024  # candidates scored per forward during validation


class Banks(NamedTuple):
    """The training set's features on the training device."""

    tokens: torch.Tensor  # (U, L, d) float16
    token_mask: torch.Tensor  # (U, L) bool
    patches: torch.Tensor  # (N, P, d) float16
    # (weight, query vectors (U, D), image vectors (N, D)) for residual training, else None
    residual: tuple[float, torch.Tensor, torch.Tensor] | None = None


def _gather_queries(banks: Banks, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token features (float32) and mask of caption bank ``rows``, without the columns that
    are padding for every one of them."""
    mask = banks.token_mask[rows]  # (Q, L)
    real = mask.any(dim=0)
    return banks.tokens[rows][:, real].float(), mask[:, real]


def _forward(
    model: CrossAttentionReranker,
    banks: Banks,
    caption: np.ndarray,
    candidates: np.ndarray,
    device: torch.device,
) -> torch.Tensor:
    """``(B, k)`` float32 logits of the queries' candidate lists, gathered from the banks.

    With residual training the logits are the reranker's plus the weighted first-stage cosine.
    """
    import torch

    from crossrank.rerank.cross_attention import AttentionPath

    u = torch.from_numpy(caption).to(device)
    c = torch.from_numpy(candidates).to(device)
    x, mask = _gather_queries(banks, u)  # (B, L_b, d), (B, L_b)
    if model.config.foldable_layers == 0:
        # Patch self-attention (or back-attention) is per image, not per (query, candidate):
        # run it once per distinct image of the step (in-batch negatives repeat images) and
        # let every list read the keys/values of its candidates.
        images, where = torch.unique(c, return_inverse=True)  # (n,), (B, k)
        kv = model.precompute_kv(banks.patches[images].float()).select(where)  # lead (B, k)
        logits = model.forward_batch(x, mask, kv)
    else:
        # auto folds the key/value projections into the query side: about twice as fast a
        # training step on the CPU as projecting every candidate's patches.
        p = banks.patches[c].float()  # (B, k, P, d)
        logits = model.forward_batch(x, mask, p, path=AttentionPath.AUTO)
    if banks.residual is not None:
        weight, q_vec, i_vec = banks.residual
        cosine = torch.einsum("bd,bkd->bk", q_vec[u], i_vec[c])  # (B, k) float32
        logits = logits.float() + weight * cosine
    return logits


def forward_captions(
    model: CrossAttentionReranker,
    banks: Banks,
    rows: np.ndarray,
    image: np.ndarray,
    device: torch.device,
    *,
    residual: bool = True,
    attend_to: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``(B, 1 + M)`` float32 logits of each image against its caption bank rows ``(B, 1 + M)``.

    The image's keys/values are computed once and read by its ``1 + M`` captions; residual
    training adds the weighted first-stage cosine of each (caption, image), as :func:`_forward`,
    unless ``residual`` is False (caption-only steps train the reranker's own logits).
    With ``attend_to`` ``(B, P, c)`` (per-patch channels of each image), also returns the last
    layer's attention mass on them, ``(B, 1 + M, n, c)`` (see ``forward_batch``).
    """
    import torch

    b, m1 = rows.shape
    u = torch.from_numpy(rows.reshape(-1)).to(device)  # (B * (1 + M),)
    img = torch.from_numpy(image).to(device)  # (B,)
    x, mask = _gather_queries(banks, u)  # (B * (1 + M), L_b, d), (B * (1 + M), L_b)
    owner = torch.arange(b, device=device).repeat_interleave(m1)  # each query's image
    kv = model.precompute_kv(banks.patches[img].float()).select(owner).unsqueeze(1)
    attended = None
    if attend_to is None:
        logits = model.forward_batch(x, mask, kv)  # (B * (1 + M), 1)
    else:
        channels = attend_to[owner].unsqueeze(1)  # (B * (1 + M), 1, P, c)
        logits, attended = model.forward_batch(x, mask, kv, attend_to=channels)
        attended = attended.view(b, m1, *attended.shape[-2:])  # (B, 1 + M, n, c)
    logits = logits.view(b, m1)  # (B, 1 + M)
    if residual and banks.residual is not None:
        weight, q_vec, i_vec = banks.residual
        cosine = (q_vec[u].view(b, m1, -1) * i_vec[img][:, None, :]).sum(-1)  # (B, 1 + M)
        logits = logits.float() + weight * cosine
    return logits if attended is None else (logits, attended)


def _validate(
    model: CrossAttentionReranker,
    data: TrainingSet,
    val_candidates: np.ndarray,
    banks: Banks,
    device: torch.device,
    rewrites: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """``val_accuracy`` on the fixed candidate lists, ``val_r1`` reranking the first-stage lists,
    and with caption negatives ``val_caption_accuracy``: the true caption ranked first among its
    fixed rewrites ``(rows, valid)`` on its image."""
    import torch

    from crossrank.rerank.cross_attention import _autocast

    model.eval()
    hits, r1 = [], []
    with torch.inference_mode(), _autocast(device):
        per = max(1, _EVAL_CANDIDATES // val_candidates.shape[1])
        for lo in range(0, val_candidates.shape[0], per):
            logits = _forward(
                model,
                banks,
                data.val_captions[lo : lo + per],
                val_candidates[lo : lo + per],
                device,
            )
            hits.append(top1_accuracy(logits).cpu().numpy())
        fs = data.val_first_stage  # (V, mine_k), -1 padded
        per = max(1, _EVAL_CANDIDATES // fs.shape[1])
        for lo in range(0, fs.shape[0], per):
            chunk = fs[lo : lo + per]
            logits = _forward(
                model, banks, data.val_captions[lo : lo + per], np.maximum(chunk, 0), device
            )
            logits = logits.masked_fill(torch.from_numpy(chunk < 0).to(device), float("-inf"))
            # The first of the tied top candidates: ties keep the first-stage order, as in search.
            top = _near_top(logits).int().argmax(dim=1).cpu().numpy()  # (b,)
            r1.append(data.val_relevant[lo : lo + per][np.arange(chunk.shape[0]), top])
        caption_hits = []
        if rewrites is not None:
            rows, valid = rewrites
            per = max(1, _EVAL_CANDIDATES // rows.shape[1])
            for lo in range(0, rows.shape[0], per):
                logits = forward_captions(
                    model, banks, rows[lo : lo + per], data.val_image[lo : lo + per], device
                )
                keep = torch.from_numpy(valid[lo : lo + per]).to(device)
                caption_hits.append(
                    top1_accuracy(logits.masked_fill(~keep, float("-inf"))).cpu().numpy()
                )
    model.train()
    out = {
        "val_accuracy": float(np.concatenate(hits).mean()),
        "val_r1": float(np.concatenate(r1).mean()),
    }
    if caption_hits:
        out["val_caption_accuracy"] = float(np.concatenate(caption_hits).mean())
    return out


def _near_top(logits: torch.Tensor) -> torch.Tensor:
    """``(B, k)`` bool: the logits tied with their row's maximum.

    A tie allows for float rounding (1e-5 relative): the same state in two rows of one batched
    matmul can come out a few ulps apart, and an untrained gated model gives every candidate the
    same state.
    """
    top = logits.max(dim=1, keepdim=True).values  # (B, 1)
    return logits >= top - (1e-6 + 1e-5 * top.abs())  # (B, k)


def top1_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float: 1 where the positive (column 0) alone has the top logit, ``1/t`` where it
    ties with ``t - 1`` others (the expected hit under a random tie break), else 0.

    Tie-aware because an untrained gated model gives every candidate the same logit: ``argmax``
    would then pick column 0 and report a perfect score.
    """
    at_top = _near_top(logits)  # (B, k)
    return at_top[:, 0].float() / at_top.sum(dim=1).float()  # (B,)


def _first_stage_metrics(data: TrainingSet) -> dict[str, float]:
    """The first stage's R@1 and recall at ``mine_k`` on the validation captions."""
    if not data.val_captions.size:
        return {}
    return {
        "r1": float(data.val_relevant[:, 0].mean()),
        "recall": float(data.val_relevant.any(axis=1).mean()),
    }
