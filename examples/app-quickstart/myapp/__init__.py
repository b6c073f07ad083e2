"""myapp: a small application whose background work runs on chunkd."""
