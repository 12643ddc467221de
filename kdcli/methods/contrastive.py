"""Contrastive representation distillation (CRD): the student's embedding contrasted against a memory of the
teacher's embeddings of every training example."""

from __future__ import annotations
