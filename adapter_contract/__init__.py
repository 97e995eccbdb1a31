"""What training and serving agree on: the label set, the prompt, the adapter manifest and where
adapters are stored. Nothing here imports torch or vLLM, so every side can depend on it."""
