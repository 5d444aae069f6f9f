"""Closed-form KL divergences between factorised Gaussian weight distributions."""

from __future__ import annotations

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
