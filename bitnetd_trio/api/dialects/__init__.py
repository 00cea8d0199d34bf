"""Endpoint dialects: one module per family of generating endpoints, each shaping the same
`Reply` into its own wire format (whole bodies, stream events, finish reasons, logprobs).

`base` defines the interface the generation flow talks to. A new family is a new module with a
`Dialect` subclass, and its paths registered in `bitnetd_trio.api.asgi`'s route table.
"""
