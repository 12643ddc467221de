"""Models: timm networks (plus the CIFAR nets kdcli registers into timm) and kdcli checkpoints."""

from kdcli.models.checkpoint import ModelMeta
from kdcli.models.classifier import Classifier, DataFacts, Loaded, load

__all__ = ["Classifier", "DataFacts", "Loaded", "ModelMeta", "load"]
