"""The algorithm: the model, its routing policies, the evicting KV cache, FLOPs accounting and the
training objective. Imports torch and fairscale only: no files, flags, printing or process groups."""
