"""How the models run, as explicit options and module replacements (never patches).

* `fast`: the DiT fast path (`FastOptions`, `make_fast`: SDPA backends, cached RoPE tables,
  fused routing map, compiled blocks, fp8 GEMM flags);
* `fp8_attention`: the video self-attention in fp8 through cuDNN;
* `fp8_gelu`: the FFN's GELU and fp8 quantisation in one pass (Triton on CUDA);
* `tiny_models`: tiny random models of every component, for tests and `--model tiny`.
"""
