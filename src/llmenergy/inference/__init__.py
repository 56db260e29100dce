"""One rank: the fairscale LLaMA, its weights and tokenizer, generation, the worker."""
