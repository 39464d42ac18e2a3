"""vargpt: unified multimodal understanding (next-token) and generation (next-scale), after VARGPT."""

__version__ = "0.1.0"
