"""Quantised layers (fp8; GGUF types): nn.Modules and quantisation math only, no file I/O.

`weights` may import this package, never the other way round.
"""
