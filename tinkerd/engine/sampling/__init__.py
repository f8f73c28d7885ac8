"""Sampling: request specs and the backend interface (`spec`, `backend`), and the built-in
backend (`sampler`: the decode loop; `kv_cache`: its growing, mergeable KV cache;
`choose`: top-k/top-p, noise and logprobs). LoRA per row: `tinkerd.engine.lora`."""
