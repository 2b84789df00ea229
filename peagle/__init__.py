"""peagle: reproducibility and evaluation suite for P-EAGLE (arXiv 2602.01469)."""

__version__ = "0.1.0"
