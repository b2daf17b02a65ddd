"""How the weights move: the optimizer and its parameter groups (`optimizer`), the learning rate of each step
(`lr`), the numeric precision with its autocast and GradScaler (`precision`), and the moving average of the
weights (`ema`)."""
