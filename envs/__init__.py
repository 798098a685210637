"""Text environments for LLM agents; importing this package registers their Gymnasium ids."""
