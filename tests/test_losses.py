"""The math against the paper's equations (docs/method.md), in float64, independent of the implementation.

The expected gradients are written out by hand from the closed forms: for a token t with label y,
d log softmax(z_{t-1})[y] / d z_{t-1} = onehot(y) - softmax(z_{t-1}).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from llamafactory_minorsft.train import losses

IGNORE = losses.IGNORE_INDEX


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_batch(seed=0, batch=4, length=9, vocab=11):
    """Random logits and labels with masked prompt tokens and right padding, like the SFT collator's."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen) * 2
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    prompt_lengths = [2, 3, 1, 4][:batch]
    answer_lengths = [4, 2, 6, 1][:batch]
    for i in range(batch):
        labels[i, : prompt_lengths[i]] = IGNORE
        labels[i, prompt_lengths[i] + answer_lengths[i] :] = IGNORE
    return logits, labels


def grad_of_sequence_logp(logits, labels):
    """d log π(y_i|x_i) / d logits for each sample i, from the closed form (no autograd)."""
    probs = torch.softmax(logits, dim=-1)
    grads = torch.zeros((logits.size(0),) + logits.shape)
    for i in range(logits.size(0)):
        for t in range(1, logits.size(1)):
            if labels[i, t] != IGNORE:
                grads[i, i, t - 1] += F.one_hot(labels[i, t], logits.size(-1)) - probs[i, t - 1]
    return grads


def reference_sequence_logps(logits, labels):
    """Σ_t log softmax(z_{t-1})[y_t] and m, by a plain loop."""
    logp = torch.log_softmax(logits, -1)
    sums, counts = [], []
    for i in range(logits.size(0)):
        terms = [logp[i, t - 1, labels[i, t]] for t in range(1, logits.size(1)) if labels[i, t] != IGNORE]
        sums.append(torch.stack(terms).sum())
        counts.append(len(terms))
    return torch.stack(sums), torch.tensor(counts)


def test_sequence_logps_is_the_sum_over_response_tokens():
    logits, labels = make_batch()
    logps, num_tokens = losses.sequence_logps(logits, labels)
    expected_logps, expected_counts = reference_sequence_logps(logits, labels)
    torch.testing.assert_close(logps, expected_logps)
    assert num_tokens.tolist() == expected_counts.tolist() == [4, 2, 6, 1]


@pytest.mark.parametrize("chunk_tokens", [1, 5, 7, 10_000])
def test_chunked_token_logps_equal_plain_log_softmax_gather(chunk_tokens):
    logits, labels = make_batch(seed=3)
    plain_logits = logits.clone().requires_grad_()
    chunked_logits = logits.clone().requires_grad_()
    shifted = labels[:, 1:]
    mask = shifted != IGNORE
    plain = torch.log_softmax(plain_logits[:, :-1], -1).gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    plain = plain * mask
    chunked, chunked_mask = losses.per_token_logps(chunked_logits, labels, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(chunked, plain)
    assert torch.equal(chunked_mask, mask)
    weights = torch.randn(plain.shape, generator=torch.Generator().manual_seed(1))
    (plain * weights).sum().backward()
    (chunked * weights).sum().backward()
    torch.testing.assert_close(chunked_logits.grad, plain_logits.grad)


def test_sft_dpo_gradient_is_eq4():
    beta = 0.3
    logits, labels = make_batch(seed=1)
    ref_logps = reference_sequence_logps(logits, labels)[0] + torch.tensor([1.5, -2.0, 0.7, 0.0])
    logits.requires_grad_()
    policy_logps, _ = losses.sequence_logps(logits, labels)
    loss = losses.sft_dpo_loss(policy_logps, ref_logps, beta).mean()  # E over the N samples
    loss.backward()

    with torch.no_grad():
        r = reference_sequence_logps(logits, labels)[0] - ref_logps
        per_sample_grad = grad_of_sequence_logp(logits, labels)
        weights = beta * torch.sigmoid(-beta * r)  # Eq. 4: −E[β σ(−βr) ∇ log π_θ(y|x)]
        expected = -(weights.view(-1, 1, 1, 1) * per_sample_grad).mean(0)
        expected_value = -F.logsigmoid(beta * r).mean()  # Eq. 3
    torch.testing.assert_close(loss.detach(), expected_value)
    torch.testing.assert_close(logits.grad, expected)


def test_minorsft_gradient_is_eq7():
    beta = 0.04
    logits, labels = make_batch(seed=2)
    ref_logps = reference_sequence_logps(logits, labels)[0] + torch.tensor([30.0, -12.0, 4.0, -50.0])
    logits.requires_grad_()
    policy_logps, num_tokens = losses.sequence_logps(logits, labels)
    losses.minorsft_loss(policy_logps, ref_logps, num_tokens, beta).mean().backward()

    with torch.no_grad():
        r = reference_sequence_logps(logits, labels)[0] - ref_logps
        m = torch.tensor([4.0, 2.0, 6.0, 1.0])
        coefficient = 2 * torch.sigmoid(-beta * r)  # Eq. 7: −E[2 σ(−βr) (1/m) ∇ log π_θ(y|x)]
        expected = -((coefficient / m).view(-1, 1, 1, 1) * grad_of_sequence_logp(logits, labels)).mean(0)
    torch.testing.assert_close(logits.grad, expected)


def test_minorsft_closed_form_has_the_same_gradient():
    """docs/method.md: the surrogate and −E[(2/(βm)) log σ(βr)] are both correct; check the claim."""
    beta = 0.1
    logits, labels = make_batch(seed=4)
    ref_logps = reference_sequence_logps(logits, labels)[0] + torch.tensor([3.0, -1.0, 0.5, 2.0])
    surrogate_logits = logits.clone().requires_grad_()
    closed_logits = logits.clone().requires_grad_()
    policy, m = losses.sequence_logps(surrogate_logits, labels)
    losses.minorsft_loss(policy, ref_logps, m, beta).mean().backward()
    policy, m = losses.sequence_logps(closed_logits, labels)
    (-(2 / (beta * m)) * F.logsigmoid(beta * (policy - ref_logps))).mean().backward()
    torch.testing.assert_close(surrogate_logits.grad, closed_logits.grad)


def test_minorsft_at_r_zero_is_per_sample_mean_nll():
    """At step 0 (π_θ = π_ref) MinorSFT is raw SFT, Eq. 5: the per-sample mean NLL."""
    logits, labels = make_batch(seed=5)
    ref_logps = reference_sequence_logps(logits, labels)[0]
    minorsft_logits = logits.clone().requires_grad_()
    nll_logits = logits.clone().requires_grad_()
    policy, m = losses.sequence_logps(minorsft_logits, labels)
    minorsft_value = losses.minorsft_loss(policy, ref_logps, m, beta=0.04).mean()
    minorsft_value.backward()

    per_sample_nll = torch.stack(
        [F.cross_entropy(nll_logits[i, :-1], labels[i, 1:], ignore_index=IGNORE) for i in range(labels.size(0))]
    )
    per_sample_nll.mean().backward()
    torch.testing.assert_close(minorsft_value.detach(), per_sample_nll.mean().detach())
    torch.testing.assert_close(minorsft_logits.grad, nll_logits.grad, rtol=0, atol=1e-12)


def test_deviation_metric_hand_computed():
    """Eq. 8 on two samples whose log-probs are worked out by hand (uniform and peaked distributions)."""
    vocab = 4
    logits = torch.zeros(2, 4, vocab)
    logits[1, :, 2] = math.log(3.0)  # p(token 2) = 3/6 = 1/2, others 1/6
    labels = torch.tensor([[IGNORE, 1, 2, IGNORE], [IGNORE, IGNORE, 2, 2]])
    policy_logps, m = losses.sequence_logps(logits, labels)
    torch.testing.assert_close(policy_logps, torch.tensor([2 * math.log(1 / 4), 2 * math.log(1 / 2)]))
    assert m.tolist() == [2, 2]
    ref_logps = torch.tensor([2 * math.log(1 / 8), 2 * math.log(1 / 4)])
    # sample 0: (1/2)(2 log 1/4 − 2 log 1/8) = log 2; sample 1: (1/2)(2 log 1/2 − 2 log 1/4) = log 2
    per_sample = losses.deviation(policy_logps, ref_logps, m)
    torch.testing.assert_close(per_sample, torch.tensor([math.log(2), math.log(2)]))
    torch.testing.assert_close(per_sample.mean(), torch.tensor(math.log(2)))
    assert losses.deviation(policy_logps, policy_logps, m).abs().max() == 0  # 0 at step 0


def test_coefficient_starts_at_one_and_decays_with_the_log_ratio():
    r = torch.tensor([0.0, 10.0, 100.0, -10.0])
    coefficient = losses.minorsft_coefficient(r, torch.zeros(4), beta=0.04)
    assert coefficient[0] == 1.0
    assert coefficient[0] > coefficient[1] > coefficient[2] and coefficient[3] > 1.0


def test_packed_segments_equal_separate_rows():
    """neat_packing: two samples packed in one row give the same per-sample values as two rows."""
    logits, labels = make_batch(seed=6, batch=2, length=6)
    labels[0, 0] = labels[1, 0] = IGNORE  # first position of a segment never carries a label
    packed_logits = torch.cat([logits[0], logits[1]]).unsqueeze(0)
    packed_labels = torch.cat([labels[0], labels[1]]).unsqueeze(0)
    segment_ids = torch.tensor([[1] * 6 + [2] * 6])
    separate = losses.sequence_logps(logits, labels)
    packed = losses.sequence_logps(packed_logits, packed_labels, segment_ids=segment_ids)
    torch.testing.assert_close(packed[0], separate[0])
    assert packed[1].tolist() == separate[1].tolist()
    assert int(losses.count_samples(packed_labels, segment_ids)) == 2


def test_count_samples_skips_rows_without_labels():
    labels = torch.full((3, 5), IGNORE)
    labels[0, 2] = 1
    labels[2, 4] = 3
    assert int(losses.count_samples(labels)) == 2
    assert losses.sequence_logps(torch.zeros(3, 5, 4), labels)[0].numel() == 2


def test_raw_sft_gradient_is_eq5():
    """Eq. 5: −E[(1/m) Σ_t ∇ log π_θ(y_t|x, y_<t)], each sample weighted alike whatever its length."""
    logits, labels = make_batch(seed=7)
    logits.requires_grad_()
    policy_logps, num_tokens = losses.sequence_logps(logits, labels)
    losses.raw_sft_loss(policy_logps, num_tokens).mean().backward()
    m = torch.tensor([4.0, 2.0, 6.0, 1.0])
    with torch.no_grad():
        expected = -((1 / m).view(-1, 1, 1, 1) * grad_of_sequence_logp(logits, labels)).mean(0)
    torch.testing.assert_close(logits.grad, expected)


def test_token_deviation_weights_tokens_where_eq8_weights_samples():
    policy_logps = torch.tensor([-4.0, -1.0])
    ref_logps = torch.tensor([-10.0, -2.0])
    num_tokens = torch.tensor([6, 1])
    # per token: (6 + 1) / 7 = 1; per sample (Eq. 8): (6/6 + 1/1) / 2 = 1 too, so change one sample:
    assert losses.token_deviation(policy_logps, ref_logps, num_tokens).item() == 1.0
    ref_logps = torch.tensor([-10.0, -4.0])
    assert losses.token_deviation(policy_logps, ref_logps, num_tokens).item() == pytest.approx(9 / 7)
    assert losses.deviation(policy_logps, ref_logps, num_tokens).mean().item() == pytest.approx((1 + 3) / 2)


def vocabulary_kl_by_loops(policy_logits, ref_logits, labels):
    """Per sample, the mean over label positions of Σ_v p_ref(v) (log p_ref(v) − log p_θ(v)), written out with
    Python floats (math.exp/log over each vocabulary entry), independent of torch's log_softmax."""
    per_sample, all_terms = [], []
    for i in range(labels.size(0)):
        terms = []
        for t in range(1, labels.size(1)):
            if labels[i, t] == IGNORE:
                continue
            z_ref, z_pol = ref_logits[i, t - 1].tolist(), policy_logits[i, t - 1].tolist()
            norm_ref = math.log(sum(math.exp(z) for z in z_ref))
            norm_pol = math.log(sum(math.exp(z) for z in z_pol))
            terms.append(
                sum(math.exp(zr - norm_ref) * ((zr - norm_ref) - (zp - norm_pol)) for zr, zp in zip(z_ref, z_pol))
            )
        per_sample.append(sum(terms) / len(terms))
        all_terms += terms
    return torch.tensor(per_sample), sum(all_terms) / len(all_terms)


@pytest.mark.parametrize("chunk_tokens", [1, 3, None])
def test_exact_kl_is_the_per_sample_mean_of_the_vocabulary_kl(chunk_tokens):
    logits, labels = make_batch(seed=8)
    ref_logits = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))
    expected, token_mean = vocabulary_kl_by_loops(logits, ref_logits, labels)
    kl = losses.exact_kl(logits, ref_logits, labels, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(kl, expected, rtol=1e-10, atol=1e-12)
    # Samples of 4, 2, 6 and 1 tokens: the mean over samples is not the mean over tokens (the spec's weighting).
    assert abs(kl.mean().item() - token_mean) > 1e-3
    assert (kl > 0).all()


def test_exact_kl_is_zero_for_the_same_distributions_and_never_negative():
    logits, labels = make_batch(seed=10)
    assert losses.exact_kl(logits, logits.clone(), labels).abs().max().item() == 0.0
    # Shifting every logit of a position by a constant leaves its distribution unchanged: rounding only.
    shifted = logits + 1e3 * torch.rand(logits.shape[:-1] + (1,), generator=torch.Generator().manual_seed(11))
    kl, mask = losses.per_token_kl(logits.float(), shifted.float(), labels)
    assert (kl >= 0).all() and kl[mask].max().item() < 1e-3
    assert (kl[~mask] == 0).all()


def test_exact_kl_of_packed_segments_equals_separate_rows():
    logits, labels = make_batch(seed=12, batch=2, length=6)
    labels[0, 0] = labels[1, 0] = IGNORE
    ref_logits = logits.flip(-1)
    separate = losses.exact_kl(logits, ref_logits, labels)
    packed = losses.exact_kl(
        torch.cat([logits[0], logits[1]]).unsqueeze(0),
        torch.cat([ref_logits[0], ref_logits[1]]).unsqueeze(0),
        torch.cat([labels[0], labels[1]]).unsqueeze(0),
        segment_ids=torch.tensor([[1] * 6 + [2] * 6]),
    )
    torch.testing.assert_close(packed, separate)


def test_exact_kl_of_bf16_logits_is_computed_in_float32():
    """Each chunk of bf16 logits is converted to float32 before the softmax: the result equals float64 on the
    same (bf16-rounded) logits."""
    logits, labels = make_batch(seed=13)
    ref_logits = logits + 0.5
    ref_logits[..., 0] += 2.0
    bf16 = losses.exact_kl(logits.bfloat16(), ref_logits.bfloat16(), labels, chunk_tokens=2)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(
        bf16.double(), losses.exact_kl(logits.bfloat16().double(), ref_logits.bfloat16().double(), labels)
    )


def test_minor_dpo_gradient_is_eq2():
    """∇ of Eq. 2 w.r.t. (r_w, r_l): −β·σ(−β·(r_w − max(0, r_l)))·(1, −1{r_l > 0}); strictly, so the tie r_l = 0 is
    inactive (``clamp(min=0)`` would pass a gradient of 1 there, ``maximum`` 0.5)."""
    beta = 0.7
    chosen = torch.tensor([0.3, -1.2, 0.5, 2.0], requires_grad=True)
    rejected = torch.tensor([0.8, -0.4, 0.0, -0.0], requires_grad=True)
    losses.minor_dpo_loss(chosen, rejected, beta).sum().backward()
    active = torch.tensor([1.0, 0.0, 0.0, 0.0])
    coefficient = -beta * torch.sigmoid(-beta * (chosen.detach() - active * rejected.detach()))
    assert torch.allclose(chosen.grad, coefficient)
    assert torch.allclose(rejected.grad, -coefficient * active)
    assert losses.rejected_term_active(rejected).tolist() == [True, False, False, False]


def test_minor_dpo_is_dpo_while_the_rejected_ratio_is_positive_and_eq3_after():
    chosen, rejected = torch.tensor([0.4, 0.4, -1.0]), torch.tensor([0.9, -0.9, 0.0])
    minor = losses.minor_dpo_loss(chosen, rejected, 0.1)
    # Eq. 1 (LLaMA-Factory's sigmoid DPO) while r_l > 0; Eq. 3 on the chosen response once r_l <= 0.
    assert torch.allclose(minor[0], -F.logsigmoid(0.1 * (chosen[0] - rejected[0])))
    assert torch.equal(minor[1:], losses.sft_dpo_loss(chosen[1:], torch.zeros(2), 0.1))


def test_row_logps_keep_every_row_in_place():
    logits, labels = make_batch()
    labels[1] = IGNORE  # a row without labels stays, as 0 and 0, so that pairs keep their positions
    logps, num_tokens = losses.row_logps(logits, labels)
    kept, kept_tokens = losses.sequence_logps(logits, labels)
    assert logps.shape == (4,) and logps[1] == 0 and num_tokens[1] == 0
    assert torch.allclose(logps[[0, 2, 3]], kept) and torch.equal(num_tokens[[0, 2, 3]], kept_tokens)
    assert torch.equal(losses.label_counts(labels), num_tokens)
