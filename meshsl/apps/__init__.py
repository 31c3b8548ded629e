"""Applications built on the runtime's public objects: prediction, export, audits, alignment reports,
one-process reference training, LLM generation/assembly, and sites (per-party agents and jobs)."""
