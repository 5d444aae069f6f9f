"""Offline data sets: UCI regression benchmarks, a 1-D toy curve, classification splits, text."""

from bnnpyro.data.toy import (
    CLASSIFICATION_DATASETS,
    ClassificationSplit,
    load_classification,
    make_moons,
    make_spirals,
    toy_regression,
    toy_regression_curve,
)
from bnnpyro.data.text import TEXT_DATASETS, CharVocab, char_lm_batches, load_text
from bnnpyro.data.uci import UCI_DATASETS, UCISplit, list_uci, load_uci, uci_protocol

__all__ = [
    "CLASSIFICATION_DATASETS",
    "CharVocab",
    "TEXT_DATASETS",
    "char_lm_batches",
    "load_text",
    "ClassificationSplit",
    "UCI_DATASETS",
    "UCISplit",
    "list_uci",
    "load_classification",
    "load_uci",
    "make_moons",
    "make_spirals",
    "toy_regression",
    "toy_regression_curve",
    "uci_protocol",
]
