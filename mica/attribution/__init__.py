"""Stage 09's explanations: :mod:`mica.attribution.integrated_gradients` (captum IG on both inputs, the per-slide
attribution files) and :mod:`mica.attribution.explain` (IG of a fold's validation slides with done-records, the
cohort's marker attribution)."""
