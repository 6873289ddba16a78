"""Federated fine-tuning across a fleet of devices on Flower (ClientApp on the device, ServerApp on the host)."""
