"""The math of MinorSFT (Xie et al. 2024, arXiv 2408.10642), and nothing else.

This module imports only torch. Every function returns **per-sample** values; the trainer takes the
mean over the global batch (``E[...]`` in the paper), so micro-batching cannot change the result.

Notation (as in the paper; derivations in ``docs/method.md``):
    log π(y|x) = Σ_t log π(y_t | x, y_<t)       summed over the m response tokens (labels != -100)
    r(x, y)    = log π_θ(y|x) − log π_ref(y|x)  sequence log-ratio
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100

# Logits per chunk when turning them into per-token log-probs: a chunk's fp32 log-softmax is the only
# full-vocabulary float32 tensor alive at a time, forward and backward. Cache-sized on CPU (32 MiB;
# measured faster than larger chunks), larger on accelerators, where every chunk costs kernel launches.
CHUNK_ELEMENTS = {"cpu": 2**23, "accelerator": 2**26}


class _ChunkedLabelLogps(torch.autograd.Function):
    """``log softmax(logits)[label]`` per row of ``[N, V]`` logits, in at least float32, ``chunk`` rows
    at a time.

    Saves the logits themselves (no copy) and one log-sum-exp per row; the backward writes
    ``g · (onehot(label) − softmax)`` chunk by chunk into a single gradient tensor, so neither pass
    holds more than one chunk in float32 (autograd over chunk slices would allocate a full-size
    gradient per chunk).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logps = torch.empty(labels.shape, dtype=dtype, device=logits.device)
        log_norm = torch.empty_like(logps)
        for start in range(0, labels.numel(), chunk):
            rows = slice(start, start + chunk)
            chunk_logits = logits[rows].to(dtype)
            log_norm[rows] = torch.logsumexp(chunk_logits, dim=-1)
            logps[rows] = chunk_logits.gather(-1, labels[rows, None]).squeeze(-1) - log_norm[rows]
        ctx.save_for_backward(logits, labels, log_norm)
        ctx.chunk = chunk
        return logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps: torch.Tensor):
        logits, labels, log_norm = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, labels.numel(), ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            weight = grad_logps[rows, None].to(log_norm.dtype)
            chunk_grad = (logits[rows].to(log_norm.dtype) - log_norm[rows, None]).exp_().mul_(-weight)
            grad[rows] = chunk_grad.scatter_add_(-1, labels[rows, None], weight)
        return grad, None, None


def per_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log π(y_t | x, y_<t) of the label tokens, and the mask of tokens that carry a label.

    ``logits`` is ``[B, T, V]`` and ``labels`` ``[B, T]`` aligned with the inputs (Hugging Face
    convention: the logit at position t predicts the label at t + 1). Returns two ``[B, T-1]``
    tensors; masked positions hold a log-prob of 0.

    Equal to ``logits.log_softmax(-1).gather(-1, labels)`` but computed ``chunk_tokens`` positions
    (default: ``CHUNK_ELEMENTS`` logits) at a time, forward and backward, so no float32 copy of the
    full logits is ever made (bf16 logits of a 150k-vocabulary model are large; their fp32 copy is
    twice that).
    """
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    # Shift the labels, not the logits: logits[:, :-1] is not contiguous, and flattening it would copy them.
    safe_labels = F.pad(labels.masked_fill(~mask, 0), (0, 1))
    flat_logits = logits.reshape(-1, logits.size(-1))
    flat_labels = safe_labels.reshape(-1)
    if chunk_tokens is None:
        elements = CHUNK_ELEMENTS["cpu" if logits.device.type == "cpu" else "accelerator"]
        chunk_tokens = max(1, elements // logits.size(-1))
    if flat_labels.numel() == 0:
        return flat_logits.new_zeros(labels.shape, dtype=torch.promote_types(logits.dtype, torch.float32)), mask
    token_logps = _ChunkedLabelLogps.apply(flat_logits, flat_labels, chunk_tokens).view_as(safe_labels)[:, :-1]
    return token_logps * mask, mask


def _sum_per_sample(values: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """Sum ``[B, T-1]`` per-token values per sample: per row, or per packed segment of a row."""
    if segment_ids is None:
        return values.sum(-1)
    # The label at t + 1 belongs to the segment of input position t + 1.
    segments = segment_ids[:, 1:].long()
    num_slots = segments.size(1) + 1
    rows = torch.arange(segments.size(0), device=segments.device).unsqueeze(1)
    flat_index = (rows * num_slots + segments).reshape(-1)
    return values.new_zeros(segments.size(0) * num_slots).index_add(0, flat_index, values.reshape(-1))


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y|x) = Σ_{t=1..m} log π(y_t | x, y_<t) per sample (the **sum**, as in DPO), and m.

    Without ``segment_ids`` a sample is a row of the batch. With packed sequences, ``segment_ids``
    ``[B, T]`` gives each packed sample of a row its own number, and each segment is a sample.

    Returns ``(logps [N], num_tokens [N])`` for the N samples that carry at least one label, in
    row-major order of appearance.
    """
    token_logps, mask = per_token_logps(logits, labels, chunk_tokens)
    logps = _sum_per_sample(token_logps, segment_ids)
    num_tokens = _sum_per_sample(mask.long(), segment_ids)
    has_labels = num_tokens > 0
    return logps[has_labels], num_tokens[has_labels]


def row_logps(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y|x) and m of every row of the batch, a row without labels included (as 0 and 0): the rows of a
    preference batch are matched into pairs by their position."""
    token_logps, mask = per_token_logps(logits, labels, chunk_tokens)
    return token_logps.sum(-1), mask.sum(-1)


def label_counts(labels: torch.Tensor) -> torch.Tensor:
    """m of every row: its tokens that carry a label (labels are shifted by one, as for ``per_token_logps``)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def count_samples(labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """N, the number of samples ``sequence_logps`` returns for these labels (a 0-dim tensor, no sync)."""
    mask = (labels[:, 1:] != IGNORE_INDEX).long()
    return (_sum_per_sample(mask, segment_ids) > 0).sum()


def log_ratio(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """r(x, y) = log π_θ(y|x) − log π_ref(y|x), per sample."""
    return policy_logps - ref_logps


def raw_sft_loss(policy_logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Raw SFT, Eq. 5: per-sample ``−(1/m) · log π_θ(y|x)``, the mean NLL over the sample's response tokens.

    Its gradient is Eq. 5: ``−(1/m) · Σ_t ∇ log π_θ(y_t|x, y_<t)``. It is MinorSFT (Eq. 7) without the
    coefficient, the control that tells the coefficient's effect from the per-sample weighting.
    """
    return -policy_logps / num_tokens


def sft_dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """SFT using DPO, Eq. 3: per-sample ``−log σ(β · r(x, y))``.

    Its gradient is Eq. 4: ``−β · σ(−β·r) · ∇ log π_θ(y|x)`` (sequence sum, no 1/m).
    """
    return -F.logsigmoid(beta * log_ratio(policy_logps, ref_logps))


def minor_dpo_loss(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """MinorDPO, Eq. 2: per-pair ``−log σ(β · (r_w − max(0, r_l)))``.

    The rejected response is penalised only while ``r_l > 0``; once ``r_l ≤ 0`` the pair's loss is Eq. 3 on the
    chosen response. ``relu`` makes the tie ``r_l = 0`` inactive (its gradient there is 0; ``clamp(min=0)``
    would pass 1 and ``maximum`` 0.5), which decides the first update whenever the reference is the starting model.
    """
    return -F.logsigmoid(beta * (chosen_ratio - torch.relu(rejected_ratio)))


def rejected_term_active(rejected_ratio: torch.Tensor) -> torch.Tensor:
    """Per pair, whether Eq. 2's rejected term acts (``r_l > 0``, strictly), as a boolean tensor."""
    return rejected_ratio > 0


def minorsft_coefficient(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The sample-level coefficient of Eq. 7, ``2 · σ(−β · r(x, y))``: 1 at r = 0, decaying as r grows."""
    return 2.0 * torch.sigmoid(-beta * log_ratio(policy_logps, ref_logps))


def minorsft_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, num_tokens: torch.Tensor, beta: float
) -> torch.Tensor:
    """MinorSFT, Eq. 7, as the surrogate ``−2 · sg(σ(−β·r)) · (1/m) · log π_θ(y|x)`` per sample.

    Its gradient is exactly Eq. 7: ``−2 · σ(−β·r) · (1/m) · ∇ log π_θ(y|x)``. At r = 0 (step 0,
    π_θ = π_ref) the coefficient is 1 and the value is the per-sample mean NLL of raw SFT (Eq. 5).
    """
    coefficient = minorsft_coefficient(policy_logps, ref_logps, beta).detach()
    return -coefficient * policy_logps / num_tokens


def deviation(policy_logps: torch.Tensor, ref_logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Per-sample term of the deviation metric, Eq. 8: ``(1/m) · [log π_θ(y|x) − log π_ref(y|x)]``.

    The metric M is the mean of these over the N samples of a batch or evaluation set.
    """
    return log_ratio(policy_logps, ref_logps) / num_tokens


def token_deviation(policy_logps: torch.Tensor, ref_logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """The per-token counterpart of Eq. 8 over a set of samples: ``Σ_i r(x_i, y_i) / Σ_i m_i``.

    The gain in log-likelihood per response token over the reference, every token weighted alike (as
    LLaMA-Factory's SFT loss weights them); Eq. 8 weights every sample alike instead. On held-out domain data the
    two are the two measures of learning. Takes the samples' sums and returns one value.
    """
    return log_ratio(policy_logps, ref_logps).sum() / num_tokens.sum()


@torch.no_grad()
def per_token_kl(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL_t = Σ_v π_ref(v|c_t) · [log π_ref(v|c_t) − log π_θ(v|c_t)]`` at every label position, clamped at 0.

    The exact drift measure (not in the paper; docs/method.md): the KL of the next-token distributions over the
    whole vocabulary at the context ``c_t = (x, y_<t)`` of each response token. ``policy_logits`` and
    ``ref_logits`` are ``[B, T, V]`` over the same positions, ``labels`` ``[B, T]`` as for ``per_token_logps``.
    Returns ``[B, T-1]`` values (0 where no label) and the label mask. Only label positions are computed, in
    chunks of ``chunk_tokens`` positions, so no float32 copy of the full logits is made. Rounding can make a KL
    of identical distributions −1e-8; the clamp keeps each term ≥ 0.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    kl = torch.zeros(mask.shape, dtype=dtype, device=policy_logits.device)
    rows, columns = mask.nonzero(as_tuple=True)
    if chunk_tokens is None:
        elements = CHUNK_ELEMENTS["cpu" if policy_logits.device.type == "cpu" else "accelerator"]
        chunk_tokens = max(1, elements // policy_logits.size(-1))
    for start in range(0, rows.numel(), chunk_tokens):
        at = (rows[start : start + chunk_tokens], columns[start : start + chunk_tokens])
        log_policy = policy_logits[at].to(dtype).log_softmax(-1)
        log_ref = ref_logits[at].to(dtype).log_softmax(-1)
        kl[at] = (log_ref.exp() * (log_ref - log_policy)).sum(-1).clamp_min(0)
    return kl, mask


def exact_kl(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Per-sample term of the exact drift measure: ``(1/m) · Σ_t KL_t`` over the sample's m label positions.

    The measure K is the mean of these over the N samples of an evaluation set (Eq. 8's weighting), so it is
    never negative and is 0 where π_θ = π_ref at the evaluated contexts. Samples are rows, or packed segments
    given by ``segment_ids`` (as for ``sequence_logps``); returns the N samples that carry a label.
    """
    kl, mask = per_token_kl(policy_logits, ref_logits, labels, chunk_tokens)
    sums = _sum_per_sample(kl, segment_ids)
    num_tokens = _sum_per_sample(mask.long(), segment_ids)
    has_labels = num_tokens > 0
    return sums[has_labels] / num_tokens[has_labels]
