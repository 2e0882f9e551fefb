"""Iteration-time prediction: BatchShape and the fitted LinearLatencyModel with its online correction. Pure (numpy,
no torch); what measures a profile on the real executor is engine/profile.py."""
