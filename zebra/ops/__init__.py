"""Numerical ops: pure-PyTorch references (the CPU path and the ground truth for tests) behind one dispatch.

Layers call only the entry points in `dispatch.py`; GPU kernels (zebra/kernels/, Triton) register there
and are imported lazily, never on a CPU-only path.
"""
