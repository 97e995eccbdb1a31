"""Fine-tune Gemma 4 with LoRA to name pet breeds: data, training, evaluation, publishing."""
