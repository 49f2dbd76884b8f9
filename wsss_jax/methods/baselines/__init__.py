"""The two reference points: `supervised` (upper bound) and `box_baseline`
(lower bound)."""
