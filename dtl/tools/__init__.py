"""The commands around training: `dtl eval` (`eval_run`), `predict`, `export`, `doctor` (the cluster
preflight) and `bench` (dtl against the loops users write)."""
