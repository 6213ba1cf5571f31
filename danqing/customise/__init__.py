"""Customisation: textual-inversion embeddings, IP-Adapter image prompts, model merging."""
