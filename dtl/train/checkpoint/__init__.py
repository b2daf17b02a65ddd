"""Checkpointing: the policy of a run -- when to save, what goes in, restoring it (`checkpointer`) -- and the
file format of a checkpoint folder: pickle-free, all-or-nothing, self-verifying (`format`)."""
