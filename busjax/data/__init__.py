"""Data: synthetic phantoms, real BUS sources, leakage-aware splits, augmentation, Grain."""
