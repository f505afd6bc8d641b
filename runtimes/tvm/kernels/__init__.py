"""Sculpt's hand-scheduled CPU kernels: dense GEMM and convolution (TE + s_tir schedules), block-sparse (TVMScript)."""
