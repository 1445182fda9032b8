"""MICA as a clinical study: metrics with bootstrap CIs, paired comparisons, models and reports."""
