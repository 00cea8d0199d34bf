"""bitnetd-trio: serve BitNet b1.58 models on CPUs over an OpenAI-compatible HTTP API."""

__version__ = "0.1.0"
