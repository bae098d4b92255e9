"""Evaluation: teacher agreement on held-out chat text (agreement.py); lm-eval tasks come later."""
