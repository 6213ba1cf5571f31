"""Every loader (checkpoints and VAEs from folders and single files, ControlNets / T2I-Adapters,
upscalers, IP-Adapter files, the CLIP tokenizer), model families, the registry and the ModelManager."""
