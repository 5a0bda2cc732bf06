"""Recorded prefetch: load the experts the trace's `predicted` tensor guessed for the next layer.
`prefetch=recorded`.

`predicted[t, l]` holds the experts guessed for layer l of token t before that layer ran (for instance
layer l's router applied to the previous layer's hidden state, the speculative loading of Eliseev &
Mazur 2023, arXiv:2312.17238, section 3.2). Such a guess exists once the layer before is routed, so this
prefetcher looks one layer ahead only (`lookahead: 1`; layer 0's guess is loaded after the previous step's
last layer). Over a batched step the guesses of its tokens are ranked by how many tokens made them.
A trace without `predicted` is refused with the reason.
"""
from __future__ import annotations

from moesim.errors import MoesimError, NotApplicable

from .prefetch_table import TablePrefetcher, ranked_rows, shift_table


class Recorded(TablePrefetcher):
    def setup(self, ctx) -> None:
        if self.lookahead != 1:
            raise MoesimError(f"prefetch=recorded: lookahead={self.lookahead}, but a recorded guess for layer l "
                              f"exists only once layer l-1 is routed; use lookahead=1")
        if ctx.trace.predicted is None:
            where = ctx.trace.path or ctx.trace.source.get("model", "the trace")
            raise NotApplicable(f"prefetch=recorded: {where} has no 'predicted' tensor (experts guessed for each "
                              f"layer before it ran); record the trace with predictions, or use "
                              f"prefetch=transition or prefetch=history, which learn from routing alone")
        super().setup(ctx)

    def build(self, ctx):
        return shift_table(ranked_rows(ctx.trace, ctx.trace.predicted, self.per_layer), 1)
