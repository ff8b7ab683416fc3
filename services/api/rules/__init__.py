"""The rule catalogue and a brand's thresholds."""
