"""visual_decoder package."""
