"""Architecture knowledge, rope math and HF -> engine conversion."""
