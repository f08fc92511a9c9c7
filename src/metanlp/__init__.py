"""metanlp: meta-learning for few-shot text classification."""
