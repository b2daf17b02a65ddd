"""One training run: built once (`build`), run epoch by epoch (`loop`, `step`), evaluated (`evaluate`),
checkpointed (`checkpointer`, `checkpoint_format`) into its run folder (`run_folder`), with the optimizer
(`optim`), numeric precision (`precision`), weight averaging (`ema`), metrics and trackers, and end-of-epoch
hooks (`hooks`). `trainer.train` is the one entry every launcher reaches."""
