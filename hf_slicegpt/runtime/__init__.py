"""Run-time machinery of a slicing run: where activations wait (offload), data parallelism (distributed), the
resumable partial state (resume), and the low-memory path that streams blocks from safetensors (streaming)."""
