"""TFDS builders (manual_dir) for BUSI and BUS-BRA."""
