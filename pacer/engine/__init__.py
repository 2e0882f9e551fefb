"""The engine loop and its collaborators (detokenizer, executor protocol)."""
