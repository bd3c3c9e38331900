"""Bringing up a cluster and its services.

A local Ray head with token authentication and an MLflow tracking server for a
single machine, and templates for the Ray cluster launcher and KubeRay for real
clusters. Used by ``anchorless.jobs``.
"""
