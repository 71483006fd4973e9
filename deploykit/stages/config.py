"""The base of every stage's typed config (a leaf module: recipes and stages both import it, it imports neither)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    """Base for every stage's config; ``version`` lets a stage migrate old recipes."""

    model_config = ConfigDict(extra="forbid")
    version: int = 1
