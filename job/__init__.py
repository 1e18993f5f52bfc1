"""job: fine-tune an LLM with (Q)LoRA from one run spec and publish verified artifacts."""

__version__ = "0.1.0"
