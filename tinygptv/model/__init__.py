"""TinyGPT-V model parts: vision encoder, Q-Former, language model, and the whole."""
