"""segda: domain-adaptive and domain-generalized semantic segmentation, as a DVC pipeline."""
