"""The base every stage stands on; it imports no stage package (preprocess, hex, mica).

errors (PipelineError, exit codes), io (atomic files, JSON, run configs), logs, done (done-records), cohort (slide
identity), tables (clinical table, splits, patient leakage), runner (per-slide loop, shards, StageReport), cli (the
one stage runner every ``python -m`` entry goes through), dist (torchrun setup), artifacts (every artifact's path
under OUT, its reader and schema version).
"""
