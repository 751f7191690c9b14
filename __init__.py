"""modalmoe: a distributed training runtime for multimodal (image + text) Mixture-of-Experts models."""

__version__ = "0.1.0"
