"""Segment modules built from their spec: layer stacks (`layers`) and LLM parts with LoRA adapters."""
