"""The model and its inference: the native binding, tokenizer, chat templates, sampling, stop
strings, the batching scheduler, the inference thread and the GGUF writer.

Imports nothing from `api`, `daemon` or `tools`.
"""
