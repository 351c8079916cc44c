"""Real pretrained models that come through pip (no model hub needed)."""
