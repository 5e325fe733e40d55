"""antipasto_pl: GRPO with hack-subspace gradient projection, on PyTorch Lightning."""

__version__ = "0.1.0"
