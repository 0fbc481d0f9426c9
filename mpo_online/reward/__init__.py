"""Rewards from ground truth: final-answer extraction and matching on raw model output (`verify`), with a bounded,
eval-free expression parser (`mathexpr`)."""
