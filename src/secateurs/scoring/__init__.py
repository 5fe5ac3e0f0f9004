"""What every method shares on the way from a model to a plan: calibration statistics (`stats`),
per-unit views of weight matrices (`weights`), the rule that turns per-unit scores into a plan
that removes exactly the target (`select`), and what makes a batch of masked sub-models score as
repaired (`compensation`: FLAP's mean compensation; `refits`: the obs repair's units and refits).
Plain tensor code plus thin hook wiring; no method here."""
