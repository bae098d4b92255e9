"""The hybrid model: mixers (attention.py, mla.py, mamba2.py), shared pieces (common.py), cache, hybrid.py."""
