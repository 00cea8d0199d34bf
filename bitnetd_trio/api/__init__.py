"""The HTTP layer: request schemas and errors, SSE, the endpoint dialects, the per-request
generation flow, the ASGI application and its metrics.

Imports `engine` and `config`, never `daemon` or `tools`.
"""
