"""Training: the reward model, PPO, the evaluation gate, the registries and the Celery tasks."""
