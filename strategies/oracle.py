"""Oracle prefetch: after each layer is routed, load the true experts of the next `lookahead` layers.
`prefetch=oracle`.

A bound (`bound = True`): it reads the future routing of the replayed trace. With enough copy bandwidth
it removes every stall a prefetch can remove; what it leaves is what no predictor of the same lookahead
can remove. Each predicted layer's experts are ranked by how many of the step's tokens chose them (ties:
the router's order); `per_layer` null loads all of them.
"""
from __future__ import annotations

from .prefetch_table import TablePrefetcher, ranked_rows, shift_table


class Oracle(TablePrefetcher):
    bound = True

    def build(self, ctx):
        return shift_table(ranked_rows(ctx.trace, ctx.trace.experts, self.per_layer), self.lookahead)
