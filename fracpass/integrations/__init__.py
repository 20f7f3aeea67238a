"""Training-loop integrations: HuggingFace ``Trainer`` (``fracpass.integrations.transformers``) and
Lightning (``fracpass.integrations.lightning``). Each is imported on its own, so fracpass never
needs either library; ``_common`` holds what they share (log entries, the Scheduler's state file)."""
