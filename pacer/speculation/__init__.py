"""Speculative decoding's drafts, proposed without a draft model: pure Python, no torch (the model runner verifies
them, with `model/verify.py`)."""
