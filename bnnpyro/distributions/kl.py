"""Closed-form KL divergences between factorised Gaussian weight distributions."""

from __future__ import annotations

from numbers import Number

import torch
from torch import Tensor


def normal_kl(
    q_mean: Tensor,
    q_scale: Tensor,
    p_mean: Tensor | float = 0.0,
    p_scale: Tensor | float = 1.0,
) -> Tensor:
    r"""
    Elementwise :math:`\mathrm{KL}(\mathcal N(\mu_q, \sigma_q^2) \,\|\, \mathcal N(\mu_p, \sigma_p^2))`.

    .. math::

        \mathrm{KL} = \log\frac{\sigma_p}{\sigma_q}
        + \frac{\sigma_q^2 + (\mu_q - \mu_p)^2}{2\sigma_p^2} - \frac12

    All arguments broadcast against each other; the result has the broadcast shape.
    """
    var_ratio = (q_scale / p_scale) ** 2
    t1 = ((q_mean - p_mean) / p_scale) ** 2
    return 0.5 * (var_ratio + t1 - 1.0 - torch.log(var_ratio))


def _is_scalar(t: Tensor | float) -> bool:
    return not torch.is_tensor(t) or t.numel() == 1


def normal_kl_sum(
    q_mean: Tensor,
    q_scale: Tensor,
    p_mean: Tensor | float = 0.0,
    p_scale: Tensor | float = 1.0,
) -> Tensor:
    r"""
    :func:`normal_kl` summed over all elements (a scalar). With a scalar prior (``p_mean``,
    ``p_scale`` floats or one-element tensors) it uses the summed closed form

    .. math::

        \sum_i \mathrm{KL}_i = \frac{\sum_i \sigma_{q,i}^2 + \sum_i (\mu_{q,i} - \mu_p)^2}{2\sigma_p^2}
        - \sum_i \log\sigma_{q,i} + n \log\sigma_p - \frac n2,

    three elementwise passes over the weights instead of ten.
    """
    if not (_is_scalar(p_mean) and _is_scalar(p_scale)):
        return normal_kl(q_mean, q_scale, p_mean, p_scale).sum()
    q_mean, q_scale = torch.broadcast_tensors(q_mean, q_scale)
    n = q_mean.numel()
    p_scale = torch.as_tensor(p_scale, dtype=q_scale.dtype, device=q_scale.device).reshape(())
    p_mean = torch.as_tensor(p_mean, dtype=q_mean.dtype, device=q_mean.device).reshape(())
    squares = q_scale.pow(2).sum() + (q_mean - p_mean).pow(2).sum()
    return 0.5 * squares / p_scale.pow(2) - q_scale.log().sum() + n * (p_scale.log() - 0.5)


def minibatch_kl_factor(
    rows: int, KL_factor: float | Tensor = 1.0, dataset_size: int | None = None
) -> float | Tensor:
    r"""
    The multiplier of a layer's KL for a minibatch of ``rows`` rows: ``KL_factor`` as given, or
    ``rows / dataset_size`` when ``dataset_size = N`` is given, so that inside
    ``pyro.plate("data", N, subsample_size=rows)`` (scale ``N / rows``) the KL is counted once.

    Raises:
        ValueError: ``dataset_size`` is not a positive int, or both it and a ``KL_factor`` other
            than 1 are given.
    """
    if dataset_size is None:
        return KL_factor
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise ValueError(f"dataset_size must be a positive int, got {dataset_size!r}")
    if not (isinstance(KL_factor, Number) and KL_factor == 1.0):
        raise ValueError("give either KL_factor or dataset_size, not both")
    return rows / dataset_size
