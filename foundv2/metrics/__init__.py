"""Metrics: classification (AUC, KS), full-catalogue ranking, DDP-safe torchmetrics with sum states."""
