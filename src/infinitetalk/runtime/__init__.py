"""Runtime helpers: device memory budget, offloading, multi-GPU."""
