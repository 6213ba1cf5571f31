"""Customisation: LoRA / LyCORIS networks, textual-inversion embeddings, IP-Adapter image prompts,
model merging."""
