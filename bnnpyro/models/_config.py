"""The catalogue models' ``repr``: their constructor's arguments."""

from __future__ import annotations


class ConfigRepr:
    """Mixin for an ``nn.Module`` that keeps its constructor's arguments in ``self.config`` (as
    :func:`bnnpyro.save` writes them): ``repr`` shows them, so that models are told apart."""

    config: dict

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items() if v is not None)
