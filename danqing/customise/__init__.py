"""Customisation: LoRA / LyCORIS networks, embeddings, merging."""
