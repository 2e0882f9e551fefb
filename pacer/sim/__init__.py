"""The simulator: the real Engine and Scheduler in virtual time, with a SimExecutor in place of the model."""
