"""Smoke-test Flower App for edge_ft.fleet.deploy."""
