"""Decode attention over pre-RoPE low-rank key codes, rebuilt and rotated in the read (reference + Triton)."""
