"""Model code, written for one device: the transformer, its attention backends and layers."""
