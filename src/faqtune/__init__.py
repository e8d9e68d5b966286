"""faqtune: turn a company's FAQ into a support chatbot it can run itself (QLoRA fine-tuning)."""

__version__ = "0.1.0"
