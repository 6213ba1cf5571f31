"""Training: danqing's own base model from scratch (``base``); adapters arrive with their issues."""
