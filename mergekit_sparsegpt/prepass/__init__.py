"""The pre-pass: plan the merge with mergekit, validate it, compute or load the statistics, run
the merge."""
