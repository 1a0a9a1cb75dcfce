"""Weights in and out: Hugging Face safetensors import/export, vocabulary growth, and what a
config builds (`omnijax info`)."""
