"""Stylized copies of prepared datasets: per-image transfers (FDA, Reinhard, Lab), learned translation, and the cache that writes them."""
