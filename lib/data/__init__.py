"""Datasets: class tables, raw-layout readers, the prepared-dataset contract, loading and sampling."""
