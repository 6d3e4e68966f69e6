"""The bench stage: storage accounting, memory and latency projection, measured mode on CUDA."""
