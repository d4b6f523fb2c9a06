"""posttrain: post-training for large language models, from one laptop to a cluster."""

__version__ = "0.1.0"
