"""selfsup: self-supervised pretraining, base selection, few-label adaptation and subgroup audits."""

__version__ = "0.1.0"
