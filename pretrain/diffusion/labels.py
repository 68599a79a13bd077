"""What a loss may be called: `nelbo` only where it is one.

A schedule whose `is_nelbo` is False (the content-dependent `frequency` surrogate) trains a
weighted CE whose weights do not integrate to a likelihood bound, so no metric computed from it
may carry "nelbo" in its name:

    schedule.is_nelbo   per token slot (the always-reported sum)   validation / sample metrics
    True                nelbo_per_token_slot                       val/nelbo_per_token_slot
    False               surrogate_loss_per_token_slot              val/surrogate_loss_per_token_slot

The `masked_token` normalisation's name (`weighted_ce_per_masked_token`) never claims a bound
and is the same for both. Objectives without a schedule (none today) count as NELBOs.
"""

from __future__ import annotations

NELBO = "nelbo"
SURROGATE = "surrogate_loss"


def bound_name(schedule) -> str:
    """`nelbo` for a NELBO schedule (or none), `surrogate_loss` for a surrogate."""
    return NELBO if schedule is None or schedule.is_nelbo else SURROGATE


def per_token_slot_name(schedule) -> str:
    """The name of the weighted loss summed over masked tokens and divided by B * L slots."""
    return f"{bound_name(schedule)}_per_token_slot"
