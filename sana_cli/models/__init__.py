"""The Sana model family as data, and what a --model value names. Torch-free, no network."""
