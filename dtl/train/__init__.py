"""One training run: built once (`build`), run epoch by epoch (`loop`, `step`), evaluated (`evaluate`),
checkpointed (`checkpoint/`: `checkpointer`, `format`) into its run folder (`run_folder`), with the optimizer,
learning rate, numeric precision and weight averaging (`optimisation/`), metrics and trackers, and end-of-epoch
hooks (`hooks`). `trainer.train` is the one entry every launcher reaches."""
