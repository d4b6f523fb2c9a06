"""Starting training somewhere else than this process: Kubernetes manifests (``k8s``)."""
