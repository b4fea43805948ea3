"""Training and evaluation: loops, datasets, augmentation, metrics, weights, device, the centralized baseline (no Flower)."""
