"""Architecture knowledge and HF -> engine conversion."""
