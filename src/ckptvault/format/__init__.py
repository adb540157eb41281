"""L1: pure bytes and dicts — the manifest schema, safetensors headers, the state-tree encoding and
digests. Nothing in this package opens a file or imports torch."""
