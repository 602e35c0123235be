"""Broker configuration: immutable model, loader, and the TLS context built from it."""

from broker.config.load import load_config
from broker.config.model import Config

__all__ = ["Config", "load_config"]
