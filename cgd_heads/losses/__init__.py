"""CGD's training objective (pytorch-metric-learning's triplet loss and miner + the auxiliary classifier's loss)."""
from .cgd_loss import CGDLoss

__all__ = ['CGDLoss']
