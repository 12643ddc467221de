"""Knowledge review (ReviewKD): the student's stages, fused deepest first, mimic the teacher's stages."""

from __future__ import annotations
