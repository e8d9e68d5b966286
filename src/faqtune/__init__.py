"""faqtune: turn a company's FAQ into a support chatbot it can run itself (QLoRA fine-tuning)."""

import os

# An offline tool has nothing to report: TRL's trainers start a thread that sends usage telemetry to the Hub
# (trl/trainer/base_trainer.py, `send_telemetry`). Set before huggingface_hub reads it at import; a user
# who sets HF_HUB_DISABLE_TELEMETRY=0 keeps theirs.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
