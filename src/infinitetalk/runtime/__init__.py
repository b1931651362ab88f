"""How the models run, as explicit options and module replacements (never patches).

* `fast`: the DiT fast path (`FastOptions`, `make_fast`: SDPA backends, cached RoPE tables,
  fused routing map, compiled blocks, fp8 GEMM flags);
* `fp8_attention`: the video self-attention in fp8 through cuDNN;
* `fp8_gelu`: the FFN's GELU and fp8 quantisation in one pass (Triton on CUDA);
* `offload_plan`: how a job fits a VRAM budget (`plan_offload`, `OffloadPlan`: what stays on the
  GPU, what streams, what is chunked or tiled), a pure function of the model configs;
* `offload`: runs a plan (`Offloader`: DiT blocks streamed from host memory, the other models
  moved onto the GPU only while they run) through forward hooks;
* `parallel`: one video on several ranks (`ParallelContext`, `plan_layout`, `ParallelGuidedDiT`:
  guidance branches x sequence parallel over torch.distributed);
* `parallel_launch`: starting the ranks (`--gpus N`, `run_ranks`, torchrun);
* `sequence_parallel`: Ulysses sequence parallelism around an unchanged DiT (`SequenceParallelDiT`);
* `tiny_models`: tiny random models of every component, for tests and `--model tiny`.
"""
