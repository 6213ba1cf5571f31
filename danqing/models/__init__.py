"""Model families, loading (folders and single files), the registry and the ModelManager."""
