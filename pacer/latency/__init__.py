"""Iteration-time prediction: the fitted model (model.py, pure) and the profiler that measures it (profile.py)."""
