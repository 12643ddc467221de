"""Models: timm networks (plus the CIFAR nets kdcli registers into timm) and kdcli checkpoints."""

from kdcli.models.checkpoint import ModelMeta
from kdcli.models.classifier import Classifier, DataFacts, Loaded, default_stages, load, match_stages
from kdcli.models.ensemble import Ensemble

__all__ = ["Classifier", "DataFacts", "Ensemble", "Loaded", "ModelMeta", "default_stages", "load", "match_stages"]
