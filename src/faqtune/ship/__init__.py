"""Shipping a run: merged.py (`faqtune merge`: the adapter folded into its base, with a fidelity check),
hub.py (`faqtune push`: to the Hugging Face Hub with a model card), gguf.py (`faqtune export-gguf`: llama.cpp
and Ollama)."""
