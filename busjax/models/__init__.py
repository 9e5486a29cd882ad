"""Models: one module per family, each exposing its Model class(es) and a create function."""
