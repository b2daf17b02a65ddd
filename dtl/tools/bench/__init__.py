"""`dtl bench`: dtl's training step beside the loops a user would otherwise run, in one process, as ratios."""
