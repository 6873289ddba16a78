"""Federated fine-tuning on a fleet of devices (Flower 1.42): the deployment runtime and the fine-tuning app."""
