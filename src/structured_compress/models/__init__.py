"""Model builders: timm vision models and Hugging Face transformers, each from a config."""
