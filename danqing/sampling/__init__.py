"""Sampler table (A1111 names -> diffusers schedulers) and our denoising loop."""
