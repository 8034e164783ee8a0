"""Pruning settings."""

from __future__ import annotations

import re
from dataclasses import dataclass

from onnx_obs.errors import OnnxObsError
from onnx_obs.graph.sites import Site


@dataclass
class Selection:
    include: str | None = None
    exclude: str | None = None
    op_types: list[str] | None = None

    def picks(self, site: Site) -> bool:
        names = [site.name] + [u.node for u in site.uses]
        if self.include and not any(self._re(self.include).search(n) for n in names):
            return False
        if self.exclude and any(self._re(self.exclude).search(n) for n in names):
            return False
        return not self.op_types or any(u.op_type in self.op_types for u in site.uses)

    def names(self, site: Site) -> bool:
        """Whether --include names the site's tensor itself (not only its node)."""
        return bool(self.include) and bool(self._re(self.include).search(site.name))

    @staticmethod
    def _re(pattern: str) -> re.Pattern:
        try:
            return re.compile(pattern)
        except re.error as e:
            raise OnnxObsError(f"invalid regular expression '{pattern}': {e}") from e
