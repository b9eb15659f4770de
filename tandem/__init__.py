"""tandem: an LLM inference server whose scheduler and GPU worker run as two processes."""

__version__ = "0.1.0"
