"""busjax: JAX/Flax research code for breast-ultrasound (BUS) diagnosis."""

__version__ = "0.1.0"
