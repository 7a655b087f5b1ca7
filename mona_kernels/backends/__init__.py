"""The fused adapter's kernel plans, one package per backend."""
