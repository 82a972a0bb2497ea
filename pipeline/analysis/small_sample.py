"""One-line warnings when a run is too small for its headline to mean much (`reduce`, `controller`).

Thresholds, each a reason of its own: the least matching budget's interval spans more than a third of the
full model's cost (`WIDE_INTERVAL`); fewer than `MIN_SEQUENCES` sequences; more than half the outputs
empty (`EMPTY_SHARE`); for a controller, fewer than `MIN_PER_FOLD` sequences in a cross-fitting fold.
"""

from __future__ import annotations

WIDE_INTERVAL = 1 / 3
MIN_SEQUENCES = 30
EMPTY_SHARE = 0.5
MIN_PER_FOLD = 5


def reduce_warning(num_sequences: int, full_cost: float | None, match_interval: list | None,
                   empty_share: float) -> str | None:
    """The reducer's warning line, or None. full_cost: the full model's cost in the interval's unit."""
    reasons = []
    if num_sequences < MIN_SEQUENCES:
        reasons.append(f"only {num_sequences} sequences (< {MIN_SEQUENCES})")
    if match_interval is not None and full_cost:
        lo, hi = match_interval
        if lo is None or hi is None or hi != hi or lo != lo:
            reasons.append("the matching budget's interval is open (some resamples never match)")
        elif hi - lo > WIDE_INTERVAL * full_cost:
            reasons.append(f"the matching budget's interval ({lo:.3g}-{hi:.3g}) spans more than a third of "
                           f"{full_cost:g}")
    if empty_share > EMPTY_SHARE:
        reasons.append(f"{empty_share:.0%} of the outputs are empty")
    return None if not reasons else "small sample: " + "; ".join(reasons) + ": read the figures as indicative only"


def controller_warning(num_sequences: int, folds: int) -> str | None:
    """The controller's warning line, or None."""
    reasons = []
    if num_sequences < folds * MIN_PER_FOLD:
        reasons.append(f"{num_sequences} sequences in {folds} folds is fewer than {MIN_PER_FOLD} per fold")
    if num_sequences < MIN_SEQUENCES:
        reasons.append(f"only {num_sequences} sequences (< {MIN_SEQUENCES})")
    return None if not reasons else "small sample: " + "; ".join(reasons) + ": read the figures as indicative only"
