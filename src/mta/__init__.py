"""MTA: Merge-then-Adapt personalized LLMs."""

__version__ = "0.1.0"
