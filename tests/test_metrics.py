"""Predictive summaries and uncertainty metrics: hand-computed values, known properties, errors."""

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from bnnpyro.predict.metrics import (
    accuracy,
    auroc,
    brier,
    calibration_curve,
    classwise_ece,
    crps_ensemble,
    crps_gaussian,
    expected_calibration_error,
    expected_entropy,
    gaussian_log_likelihood,
    mean_interval_width,
    mutual_information,
    nll,
    per_class_ece,
    picp,
    predictive_entropy,
    rmse,
)
from bnnpyro.predict.summary import (
    gaussian_mixture_interval,
    mean_probs,
    normal_interval,
    predictive_mean,
    predictive_std,
    quantile_interval,
)

# Three points, three classes: argmax (0, 2, 1) against labels (0, 1, 1).
PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.4, 0.5, 0.1]])
LABELS = torch.tensor([0, 1, 1])


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- summaries -------------------------------------------------------------------------


def test_predictive_mean_and_std():
    samples = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    close(predictive_mean(samples), [2.0, 4.0])
    # population variances over S: [((1-2)^2 + (3-2)^2)/2, ((2-4)^2 + (6-4)^2)/2] = [1, 4]
    close(predictive_std(samples), [1.0, 2.0])
    # + noise variance 1: sqrt([2, 5])
    close(predictive_std(samples, noise_scale=1.0), [math.sqrt(2), math.sqrt(5)])
    # S x N noise [[1, 2], [3, 4]]: mean variances [(1+9)/2, (4+16)/2] = [5, 10] -> sqrt([6, 14])
    close(predictive_std(samples, torch.tensor([[1.0, 2.0], [3.0, 4.0]])), [math.sqrt(6), math.sqrt(14)])
    # S x 1 noise [[1], [3]]: mean variance 5 for both points -> sqrt([6, 9])
    close(predictive_std(samples, torch.tensor([[1.0], [3.0]])), [math.sqrt(6), 3.0])
    # N noise [1, 2]: sqrt([1 + 1, 4 + 4])
    close(predictive_std(samples, torch.tensor([1.0, 2.0])), [math.sqrt(2), math.sqrt(8)])


def test_quantile_interval():
    samples = torch.arange(5.0)[:, None]  # S = 5 samples 0..4 of one point
    # level 0.5 -> quantiles 0.25, 0.75 at positions 0.25 * 4 = 1 and 0.75 * 4 = 3
    lower, upper = quantile_interval(samples, level=0.5)
    close(lower, [1.0])
    close(upper, [3.0])
    # interpolation between order statistics, as torch.quantile
    samples = torch.randn(37, 11, generator=gen())
    lower, upper = quantile_interval(samples, level=0.9)
    close(lower, torch.quantile(samples, 0.05, dim=0))
    close(upper, torch.quantile(samples, 0.95, dim=0))


def test_normal_interval():
    # Phi^{-1}(0.975) = 1.959964
    lower, upper = normal_interval(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]), level=0.95)
    close(lower, [-1.959964, 1 - 2 * 1.959964])
    close(upper, [1.959964, 1 + 2 * 1.959964])


def test_gaussian_mixture_interval():
    mean = torch.randn(1, 6, generator=gen(), dtype=torch.float64)
    std = torch.rand(6, generator=gen(1), dtype=torch.float64) + 0.5
    # one component: the Normal interval
    lower, upper = gaussian_mixture_interval(mean, std, level=0.9)
    n_lower, n_upper = normal_interval(mean[0], std, level=0.9)
    close(lower, n_lower, atol=1e-10)
    close(upper, n_upper, atol=1e-10)
    # many components: the mixture CDF at the ends is (1 -/+ level) / 2
    mean = 3 * torch.randn(8, 6, generator=gen(2), dtype=torch.float64)
    noise = torch.rand(8, 6, generator=gen(3), dtype=torch.float64) + 0.1
    lower, upper = gaussian_mixture_interval(mean, noise, level=0.8)
    cdf = lambda t: torch.special.ndtr((t - mean) / noise).mean(0)  # noqa: E731
    close(cdf(lower), torch.full((6,), 0.1, dtype=torch.float64), atol=1e-10)
    close(cdf(upper), torch.full((6,), 0.9, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("outlier", [1e3, 1e6])
def test_gaussian_mixture_interval_is_precise_relative_to_the_quantile_not_the_spread(outlier):
    """99 components at 0 and one far away, unit noise, in float32: the interval to float32 precision
    against scipy's root of the mixture CDF (a fixed number of halvings had left an error relative
    to the spread: 5.7e-3 relative for an outlier at 1e6)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    means = [0.0] * 99 + [outlier]
    lower, upper = gaussian_mixture_interval(torch.tensor(means).unsqueeze(-1), 1.0, level=0.95)
    for got, q in ((lower, 0.025), (upper, 0.975)):
        ref = brentq(lambda t: sum(norm.cdf(t - m) for m in means) / 100 - q, -10, 10, xtol=1e-14)
        assert got.item() == pytest.approx(ref, rel=2e-6)


def test_mean_probs():
    samples = torch.tensor([[[0.2, 0.8]], [[0.6, 0.4]]])  # S=2, N=1, C=2
    close(mean_probs(samples), [[0.4, 0.6]])
    logits = torch.randn(4, 5, 3, generator=gen())
    close(mean_probs(logits, logits=True), logits.softmax(-1).mean(0))


# -- regression metrics ----------------------------------------------------------------


def test_rmse():
    # errors (0, -2, 2): sqrt((0 + 4 + 4) / 3) = sqrt(8/3) = 1.632993
    out = rmse(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 4.0, 1.0]))
    assert out.ndim == 0
    close(out, 1.632993)


def test_gaussian_log_likelihood_hand_and_single_sample():
    # mu = (1, 3), sigma = 1, y = 1: log((phi(0) + phi(2)) / 2) = log((0.398942 + 0.053991) / 2)
    #                                                          = log(0.226466) = -1.485150
    out = gaussian_log_likelihood(torch.tensor([[1.0], [3.0]]), 1.0, torch.tensor([1.0]))
    close(out, -1.485150)
    # S = 1: the Normal log density, averaged over N
    mean, y = torch.randn(20, generator=gen()), torch.randn(20, generator=gen(1))
    sigma = torch.rand(20, generator=gen(2)) + 0.1
    expected = torch.distributions.Normal(mean, sigma).log_prob(y).mean()
    close(gaussian_log_likelihood(mean[None], sigma, y), expected)
    close(gaussian_log_likelihood(mean[None], sigma[None], y), expected)


def test_gaussian_log_likelihood_noise_shapes_agree():
    mean, y = torch.randn(5, 4, generator=gen()), torch.randn(4, generator=gen(1))
    ref = gaussian_log_likelihood(mean, torch.full((5, 4), 0.7), y)
    for noise in (0.7, torch.tensor(0.7), torch.full((4,), 0.7), torch.full((5, 1), 0.7)):
        close(gaussian_log_likelihood(mean, noise, y), ref)


def test_picp_and_interval_width():
    lower, upper = torch.zeros(4), torch.ones(4)
    # 0.5 and 1 (boundary) covered, 1.5 and -0.1 not: 2 / 4
    close(picp(lower, upper, torch.tensor([0.5, 1.0, 1.5, -0.1])), 0.5)
    # widths (2, 3): 2.5
    close(mean_interval_width(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 4.0])), 2.5)


def test_normal_interval_coverage_is_nominal():
    # 100k Gaussian targets: the MC std of the coverage is sqrt(0.9 * 0.1 / 1e5) = 0.00095
    g = gen()
    mean, std = torch.randn(100_000, generator=g), torch.rand(100_000, generator=g) + 0.1
    y = mean + std * torch.randn(100_000, generator=g)
    lower, upper = normal_interval(mean, std, level=0.9)
    assert abs(picp(lower, upper, y) - 0.9) < 0.005


def test_quantile_and_mixture_interval_coverage_is_nominal():
    # targets drawn from an S=10 component Gaussian mixture per point; N = 20k targets give an
    # MC std of the coverage of sqrt(0.8 * 0.2 / 2e4) = 0.0028
    g, S, N = gen(), 10, 20_000
    mean, noise = 2 * torch.randn(S, N, generator=g), torch.rand(S, N, generator=g) + 0.2
    pick = torch.randint(S, (N,), generator=g)
    y = mean[pick, torch.arange(N)] + noise[pick, torch.arange(N)] * torch.randn(N, generator=g)
    lower, upper = gaussian_mixture_interval(mean, noise, level=0.8)
    assert abs(picp(lower, upper, y) - 0.8) < 0.015
    # empirical quantiles of 1000 observation samples per point (quantile error adds ~0.01)
    pick = torch.randint(S, (1000, N), generator=g)
    obs = mean.gather(0, pick) + noise.gather(0, pick) * torch.randn(1000, N, generator=g)
    lower, upper = quantile_interval(obs, level=0.8)
    assert abs(picp(lower, upper, y) - 0.8) < 0.02


def test_crps_hand():
    # y = mu, sigma = 1: 2 phi(0) - 1/sqrt(pi) = 0.797885 - 0.564190 = 0.233695; sigma = 2 doubles it
    close(crps_gaussian(torch.zeros(1), torch.ones(1), torch.zeros(1)), 0.233695)
    close(crps_gaussian(torch.zeros(1), 2 * torch.ones(1), torch.zeros(1)), 0.467390)
    # samples (0, 2), y = 1: E|X - y| = 1, sum_{s,t} |x_s - x_t| = 2 + 2 = 4
    # plug-in: 1 - 4 / (2 * 2^2) = 0.5; fair: 1 - 4 / (2 * 2 * 1) = 0
    samples, y = torch.tensor([[0.0], [2.0]]), torch.tensor([1.0])
    close(crps_ensemble(samples, y), 0.5)
    close(crps_ensemble(samples, y, fair=True), 0.0)


def test_crps_ensemble_matches_pairwise_form():
    samples, y = torch.randn(30, 7, generator=gen(), dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    pairs = (samples[:, None] - samples[None]).abs().mean(dim=(0, 1))
    expected = ((samples - y).abs().mean(0) - 0.5 * pairs).mean()
    close(crps_ensemble(samples, y), expected, atol=1e-12)


def test_crps_ensemble_is_shift_invariant_in_float32():
    """Samples of spread 0.1 around 1e4 (targets in raw units): float32 CRPS as accurate as for the
    same samples centred (relative error 6e-3 before: the sorted pair sum was taken uncentred)."""
    g = gen()
    samples, y = 0.1 * torch.randn(200, 50, generator=g) + 1e4, 0.1 * torch.randn(50, generator=g) + 1e4
    want = crps_ensemble(samples.double(), y.double())  # the same float32 values, in float64
    got = crps_ensemble(samples, y)
    assert abs(got.item() - want.item()) / want.item() < 1e-4


def test_crps_gaussian_matches_ensemble_of_normal_samples():
    # 20k fair-CRPS samples per point: MC std of the mean over 20 points is ~1e-3
    g = gen()
    mean, std = torch.randn(20, generator=g), torch.rand(20, generator=g) * 1.5 + 0.5
    y = mean + std * torch.randn(20, generator=g)
    samples = mean + std * torch.randn(20_000, 20, generator=g)
    close(crps_ensemble(samples, y, fair=True), crps_gaussian(mean, std, y), atol=0.01)


# -- classification metrics ------------------------------------------------------------


def test_classification_hand():
    # argmax (0, 2, 1) vs labels (0, 1, 1): 2 / 3 correct
    close(accuracy(PROBS, LABELS), 2 / 3)
    # -(log 0.7 + log 0.3 + log 0.5) / 3 = (0.356675 + 1.203973 + 0.693147) / 3 = 0.751265
    close(nll(PROBS, LABELS), 0.751265)
    # rows: 0.3^2+0.2^2+0.1^2 = 0.14, 0.1^2+0.7^2+0.6^2 = 0.86, 0.4^2+0.5^2+0.1^2 = 0.42 -> 1.42/3
    close(brier(PROBS, LABELS), 1.42 / 3)


def test_ece_and_calibration_curve_hand():
    # bins (0, 0.5], (0.5, 1]; confidences 0.7 (correct), 0.6 (wrong), 0.5 (correct)
    # bin 0: {0.5}: acc 1, conf 0.5; bin 1: {0.7, 0.6}: acc 0.5, conf 0.65
    # ECE = 1/3 * |1 - 0.5| + 2/3 * |0.5 - 0.65| = 0.166667 + 0.1 = 0.266667
    close(expected_calibration_error(PROBS, LABELS, num_bins=2), 0.8 / 3)
    conf, acc, counts = calibration_curve(PROBS, LABELS, num_bins=2)
    close(conf, [0.5, 0.65])
    close(acc, [1.0, 0.5])
    assert counts.tolist() == [1, 2]
    # empty bins: NaN confidence and accuracy, zero count
    conf, acc, counts = calibration_curve(PROBS, LABELS, num_bins=10)
    assert counts.sum() == 3 and torch.isnan(conf[counts == 0]).all() and torch.isnan(acc[counts == 0]).all()


def test_classwise_ece_hand():
    # 2 bins per class, |sum of indicators - sum of probs| per bin, / N:
    # class 0: p (0.7, 0.1, 0.4), y=0 at (1, 0, 0): bin 0 |0 - 0.5| + bin 1 |1 - 0.7| = 0.8 -> 0.8/3
    # class 1: p (0.2, 0.3, 0.5), y=1 at (0, 1, 1): bin 0 |2 - 1.0| = 1 -> 1/3
    # class 2: p (0.1, 0.6, 0.1), never: bin 0 |0 - 0.2| + bin 1 |0 - 0.6| = 0.8 -> 0.8/3
    close(per_class_ece(PROBS, LABELS, num_bins=2), [0.8 / 3, 1 / 3, 0.8 / 3])
    close(classwise_ece(PROBS, LABELS, num_bins=2), 2.6 / 9)


def test_nll_floor_eps():
    # a zero probability on the label is floored at eps: -(log eps + log 0.3 + log 0.5) / 3
    probs = torch.tensor([[0.0, 0.2, 0.8], [0.1, 0.3, 0.6], [0.4, 0.5, 0.1]])
    for eps in (1e-3, 1e-6):
        close(nll(probs, LABELS, eps=eps), -(math.log(eps) + math.log(0.3) + math.log(0.5)) / 3)
    # the floor only acts below eps: the hand value of PROBS is unchanged by eps = 0.25 < 0.3
    close(nll(PROBS, LABELS, eps=0.25), 0.751265)
    close(nll(PROBS, LABELS, eps=0.4), -(math.log(0.7) + math.log(0.4) + math.log(0.5)) / 3)
    # eps = 0 is raised to the dtype's smallest normal number: finite, -log(tiny) / 3
    tiny = torch.finfo(torch.float32).tiny
    close(nll(probs, LABELS, eps=0.0), -(math.log(tiny) + math.log(0.3) + math.log(0.5)) / 3, atol=1e-4)


def test_one_hot_predictions_are_perfect():
    onehot = torch.eye(3)[LABELS]
    close(brier(onehot, LABELS), 0.0)
    close(nll(onehot, LABELS), 0.0)
    close(accuracy(onehot, LABELS), 1.0)
    close(expected_calibration_error(onehot, LABELS), 0.0)


def test_sample_probs_are_averaged():
    samples = torch.randn(4, 6, 3, generator=gen()).softmax(-1)
    y = torch.randint(3, (6,), generator=gen())
    for metric in (accuracy, nll, brier, expected_calibration_error, classwise_ece):
        close(metric(samples, y), metric(samples.mean(0), y))


def _dirichlet_predictor(n, seed=0):
    """Dirichlet(1, 1, 1) probabilities (normalised Exp(1) draws) and labels drawn from them:
    calibrated by construction."""
    g = gen(seed)
    weights = -torch.rand(n, 3, generator=g).log()
    probs = weights / weights.sum(-1, keepdim=True)
    return probs, torch.multinomial(probs, 1, generator=g).squeeze(1)


def test_ece_of_calibrated_predictor_is_small():
    # N = 100k: per-bin |acc - conf| ~ sqrt(0.25 / n_b) with n_b ~ 7k, so ECE ~ 0.005
    probs, y = _dirichlet_predictor(100_000)
    assert expected_calibration_error(probs, y) < 0.015
    assert classwise_ece(probs, y) < 0.015


def test_ece_of_overconfident_predictor_is_large():
    # same labels, probabilities sharpened with temperature 1/4 (p^4, renormalised)
    probs, y = _dirichlet_predictor(100_000)
    sharp = probs.pow(4) / probs.pow(4).sum(-1, keepdim=True)
    assert expected_calibration_error(sharp, y) > 0.1
    assert classwise_ece(sharp, y) > 0.05


# -- uncertainty decomposition ---------------------------------------------------------


def test_entropies_hand():
    uniform = torch.full((3, 2, 4), 0.25)  # S=3, N=2, C=4
    close(predictive_entropy(uniform), [math.log(4)] * 2)
    close(predictive_entropy(uniform[0]), [math.log(4)] * 2)  # N x C
    close(mutual_information(uniform), [0.0, 0.0])
    # samples (0.5, 0.5) and (1, 0): expected entropy (log 2 + 0) / 2; mean (0.75, 0.25)
    # has entropy -(0.75 log 0.75 + 0.25 log 0.25) = 0.562335
    samples = torch.tensor([[[0.5, 0.5]], [[1.0, 0.0]]])
    close(expected_entropy(samples), [math.log(2) / 2])
    close(predictive_entropy(samples), [0.562335])
    close(mutual_information(samples), [0.562335 - math.log(2) / 2])


def test_mutual_information_zero_iff_samples_agree():
    agree = torch.randn(1, 5, 3, generator=gen()).softmax(-1).expand(4, 5, 3)
    close(mutual_information(agree), torch.zeros(5), atol=1e-6)
    # exactly zero (a difference of entropies left up to 1e-6 in float32, which made the MI of
    # deterministic predictions rank in- and out-of-distribution inputs apart)
    for S in (7, 100):
        same = torch.randn(1, 1000, 10, generator=gen(S)).softmax(-1).expand(S, 1000, 10)
        assert (mutual_information(same) == 0).all()
        assert auroc(mutual_information(same[:, :500]), mutual_information(same[:, 500:])).item() == 0.5
    # near-certain samples, one with a denormal probability that underflows in the mean: MI ~ 0, not
    # inf (a KL-to-the-mean form gave inf there)
    logits = torch.zeros(2, 1, 2)
    logits[0, 0, 1], logits[1, 0, 1] = -103.0, -200.0
    mi = mutual_information(logits, logits=True)
    assert torch.isfinite(mi).all() and mi.item() < 1e-6
    assert (mutual_information(agree) >= 0).all()
    # two confident samples that disagree: predictive entropy log 2, expected entropy 0
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    close(mutual_information(disagree), [math.log(2)])
    assert (mutual_information(torch.randn(4, 5, 3, generator=gen()).softmax(-1)) > 0).all()


def test_logits_match_probs():
    logits = torch.randn(4, 5, 3, generator=gen())
    probs = logits.softmax(-1)
    for fn in (predictive_entropy, expected_entropy, mutual_information):
        close(fn(logits, logits=True), fn(probs))
    # N x C logits (predictive_entropy's mean-prediction form): softmaxed, not read as probabilities;
    # logits (0, log 3) are probabilities (1/4, 3/4), entropy log 4 - (3/4) log 3 = 0.562335
    close(predictive_entropy(logits[0], logits=True), predictive_entropy(probs[0]))
    close(predictive_entropy(torch.tensor([[0.0, math.log(3)]]), logits=True), [0.562335])


# -- AUROC -----------------------------------------------------------------------------


def test_auroc_hand():
    # out 2 beats in 1 and ties 2; out 3 beats 1, 2 and ties 3; out 4 beats all:
    # (1 + 0.5) + (2 + 0.5) + 3 = 7 of 3 * 3 pairs
    close(auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 3.0, 4.0])), 7 / 9)
    close(auroc(torch.zeros(4), torch.ones(2)), 1.0)
    close(auroc(torch.ones(4), torch.ones(2)), 0.5)


def test_auroc_matches_sklearn_with_ties():
    g = gen()
    score_in = torch.randint(0, 6, (300,), generator=g).float()
    score_out = torch.randint(2, 8, (200,), generator=g).float()
    labels = [0] * 300 + [1] * 200
    expected = roc_auc_score(labels, torch.cat([score_in, score_out]).numpy())
    close(auroc(score_in, score_out), expected, atol=1e-6)
    # float64 scores get a float64 result: 1/3 of the pairs, not its float32 rounding
    a = auroc(torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    assert a.dtype == torch.float64 and a.item() == 2 / 3


# -- dtype, device and errors ----------------------------------------------------------


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_follow_input_device_and_dtype(device, dtype):
    g = gen()
    samples = torch.randn(6, 5, generator=g, dtype=dtype).to(device)
    y = torch.randn(5, generator=g, dtype=dtype).to(device)
    probs = torch.randn(6, 5, 3, generator=g, dtype=dtype).softmax(-1).to(device)
    labels = torch.randint(3, (5,), generator=g).to(device)
    mean, std = predictive_mean(samples), predictive_std(samples, 0.5)
    lower, upper = quantile_interval(samples)
    outputs = [
        mean, std, lower, *normal_interval(mean, std), *gaussian_mixture_interval(samples, 0.5),
        mean_probs(probs), rmse(mean, y), gaussian_log_likelihood(samples, 0.5, y), picp(lower, upper, y),
        mean_interval_width(lower, upper), crps_gaussian(mean, std, y), crps_ensemble(samples, y),
        accuracy(probs, labels), nll(probs, labels), brier(probs, labels),
        expected_calibration_error(probs, labels), *calibration_curve(probs, labels)[:2],
        classwise_ece(probs, labels), predictive_entropy(probs), expected_entropy(probs),
        mutual_information(probs), auroc(samples[0], samples[1]),
    ]
    for out in outputs:
        assert out.device.type == device and out.dtype == dtype
    for scalar in (rmse(mean, y), nll(probs, labels), auroc(samples[0], samples[1])):
        assert scalar.ndim == 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: accuracy(torch.rand(3), LABELS), r"probs must be S x N x C or N x C, got shape \(3,\)"),
        (lambda: nll(PROBS * 2, LABELS), "probs must lie in"),
        (lambda: brier(PROBS / 2, LABELS), "probs must sum to 1"),
        (lambda: accuracy(torch.full((3, 3), float("nan")), LABELS), "probs contains NaN"),
        (lambda: accuracy(PROBS, LABELS.float()), r"y must be an integer tensor of shape \(N,\)"),
        (lambda: accuracy(PROBS, LABELS[:2]), r"y must be an integer tensor of shape \(N,\) = \(3,\)"),
        (lambda: accuracy(PROBS, torch.tensor([0, 1, 3])), r"y must hold class indices in \[0, C\)"),
        (lambda: expected_calibration_error(PROBS, LABELS, num_bins=0), "num_bins must be a positive int"),
        (lambda: mean_probs(PROBS), r"probs_samples must be S x N x C, got shape \(3, 3\)"),
        (lambda: mutual_information(PROBS), r"probs_samples must be S x N x C"),
        (lambda: predictive_mean(torch.zeros(4)), r"samples must be S x N, got shape \(4,\)"),
        (lambda: predictive_mean(torch.zeros(2, 3, dtype=torch.long)), "floating-point"),
        (lambda: predictive_std(torch.zeros(2, 3), torch.ones(2)), "noise_scale must be a scalar, N,"),
        (lambda: predictive_std(torch.zeros(2, 3), -1.0), "noise_scale must be non-negative"),
        (lambda: gaussian_log_likelihood(torch.zeros(2, 3), 0.0, torch.zeros(3)), "noise_scale must be pos"),
        (lambda: gaussian_log_likelihood(torch.zeros(2, 3), 1.0, torch.zeros(2)), r"y must have shape \(N"),
        (lambda: rmse(torch.zeros(3), torch.zeros(3, 1)), r"y must have the shape of pred_mean \(3,\)"),
        (lambda: rmse(torch.zeros(3), torch.tensor([0.0, float("nan"), 0.0])), "y contains NaN"),
        (lambda: quantile_interval(torch.zeros(2, 3), level=1.0), r"level must be in \(0, 1\)"),
        (lambda: normal_interval(torch.zeros(3), -torch.ones(3)), "std must be non-negative"),
        (lambda: picp(torch.ones(3), torch.zeros(3), torch.zeros(3)), "lower must not exceed upper"),
        (lambda: crps_gaussian(torch.zeros(3), torch.zeros(3), torch.zeros(3)), "std must be positive"),
        (lambda: crps_ensemble(torch.zeros(1, 3), torch.zeros(3), fair=True), "needs S >= 2"),
        (lambda: auroc(torch.zeros(2, 2), torch.zeros(3)), r"score_in must be N_in, got shape \(2, 2\)"),
        (lambda: auroc(torch.zeros(2), torch.zeros(0)), r"score_out must be non-empty N_out"),
    ],
)
def test_bad_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_tensor_raises_type_error():
    with pytest.raises(TypeError, match="samples must be a torch.Tensor"):
        predictive_mean([[1.0, 2.0]])


@pytest.mark.parametrize("y_scale", [0.0, -2.0, float("nan"), True])
def test_evaluate_regression_names_a_bad_y_scale(y_scale):
    """A non-positive y_scale had failed with math's 'math domain error'; a one-element tensor is a number."""
    from bnnpyro.predict import evaluate_regression

    with pytest.raises(ValueError, match="y_scale must be a positive number"):
        evaluate_regression(torch.randn(4, 3), 1.0, torch.randn(3), y_scale=y_scale)
    args = torch.randn(4, 3), 1.0, torch.randn(3)
    assert evaluate_regression(*args, y_scale=torch.tensor(2.0)) == evaluate_regression(*args, y_scale=2.0)


def test_evaluate_regression_reports_original_units():
    """A predictive in original units (``y_scale=1``) and the same predictive standardized,
    ``(. - m) / s`` for targets and means, ``/ s`` for noise, with ``y_scale=s``: the same numbers
    (the log-likelihood of a density under y -> (y - m) / s gains log s). Plus the metrics by hand
    on the original units: RMSE of the sample mean, and a single-sample Normal's log density and
    95% interval."""
    from bnnpyro.predict import evaluate_regression

    g = gen()
    mean = 3 * torch.randn(7, 9, generator=g, dtype=torch.float64) + 10
    noise = torch.rand(7, 9, generator=g, dtype=torch.float64) + 0.5
    y = mean[0] + noise[0] * torch.randn(9, generator=g, dtype=torch.float64)
    m, s = 10.0, 4.0
    original = evaluate_regression(mean, noise, y)
    scaled = evaluate_regression((mean - m) / s, noise / s, (y - m) / s, y_scale=s)
    assert set(original) == {"rmse", "log_likelihood", "coverage", "interval_width", "mean_std"}
    for key, value in original.items():
        assert scaled[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert original["rmse"] == pytest.approx(float((mean.mean(0) - y).square().mean().sqrt()), rel=1e-9)
    one = evaluate_regression(mean[:1], noise[:1], y, level=0.9)
    normal = torch.distributions.Normal(mean[0], noise[0])
    assert one["log_likelihood"] == pytest.approx(float(normal.log_prob(y).mean()), rel=1e-9)
    assert one["interval_width"] == pytest.approx(float(2 * 1.6448536269514722 * noise[0].mean()), rel=1e-6)
    assert one["mean_std"] == pytest.approx(float(noise[0].mean()), rel=1e-9)


def test_evaluate_classification_hand_computed():
    """Two draws, two points, two classes: every entry by hand. Point 0 (label 0): draws (0.8, 0.2)
    and (0.6, 0.4), mean (0.7, 0.3); point 1 (label 1): both draws (0.1, 0.9), mean (0.1, 0.9)."""
    from bnnpyro.predict import evaluate_classification

    p = torch.tensor([[[0.8, 0.2], [0.1, 0.9]], [[0.6, 0.4], [0.1, 0.9]]])
    y = torch.tensor([0, 1])

    def h(q):
        return -sum(v * math.log(v) for v in q)

    mi0 = h((0.7, 0.3)) - (h((0.8, 0.2)) + h((0.6, 0.4))) / 2  # point 1's draws agree: MI 0
    m = evaluate_classification(p, y, ood_probs_samples=p.flip(1))
    assert m["accuracy"] == 1.0
    assert m["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.9)) / 2, rel=1e-6)
    # 15 bins: confidence 0.7 and 0.9 in different bins, both right: ECE = (0.3 + 0.1) / 2
    assert m["ece"] == pytest.approx(0.2, rel=1e-6)
    assert m["mi_in"] == pytest.approx(mi0 / 2, rel=1e-5)
    # the same scores in- and out-of-distribution: AUROC 0.5 and equal means
    assert m["mi_ood"] == pytest.approx(m["mi_in"], rel=1e-6) and m["auroc_mi"] == pytest.approx(0.5)
    assert set(evaluate_classification(p, y)) == {"accuracy", "nll", "ece", "mi_in"}


def test_evaluate_accepts_tensors_that_require_grad_without_warning():
    """The README's pattern: a catalogue regressor's learned noise scale requires grad (it is a
    parameter); the one-call evaluations return floats and must not warn about it."""
    import warnings

    from bnnpyro.predict import evaluate_classification, evaluate_regression

    mean_samples = torch.randn(4, 5)
    noise = torch.nn.Parameter(torch.tensor(0.5)).expand(4, 5)
    probs = torch.nn.Parameter(torch.full((3, 5, 2), 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = evaluate_regression(mean_samples, noise, torch.randn(5))
        c = evaluate_classification(probs, torch.zeros(5, dtype=torch.long), ood_probs_samples=probs)
    assert all(isinstance(v, float) for v in (*m.values(), *c.values()))


def test_logits_that_give_no_distribution_are_refused():
    """A softmax of +inf, or of a row of all -inf, is NaN: refused by name. A row with some -inf
    logits (masked classes) is a distribution: the entropy of logits (0, 0, -inf) is log 2."""
    bad_rows = torch.zeros(2, 3, 3)
    bad_rows[1, 2] = -math.inf
    with pytest.raises(ValueError, match="probs_samples.*finite logit"):
        predictive_entropy(bad_rows, logits=True)
    with pytest.raises(ValueError, match="probs_samples.*finite logit"):
        mutual_information(torch.tensor([[[0.0, math.inf, 1.0]]]), logits=True)
    masked = torch.tensor([[[0.0, 0.0, -math.inf]]])
    torch.testing.assert_close(predictive_entropy(masked, logits=True), torch.tensor([math.log(2.0)]))
