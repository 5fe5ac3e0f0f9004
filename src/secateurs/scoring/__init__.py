"""What every method shares on the way from a model to a plan: calibration statistics (`stats`),
per-unit views of weight matrices (`weights`), and the rule that turns per-unit scores into a plan
that removes exactly the target (`select`). Plain tensor code plus thin hook wiring; no method here."""
