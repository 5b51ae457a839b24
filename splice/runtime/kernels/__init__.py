"""Triton kernel sources, one file per splice op; imported only by the Triton backend."""
