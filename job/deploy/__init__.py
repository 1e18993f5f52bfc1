"""Sending a run elsewhere: Kubernetes manifests (k8s) and the launch targets (launch). Not part of a run."""
