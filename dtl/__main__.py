"""`python -m dtl ...`, the `dtl` console script and `train.py`: run a command, then leave the process the way
multi-process runs need (`distributed.exit_process`: flushed, and without interpreter finalisers that abort now and
then after gloo runs)."""

from __future__ import annotations

from dtl import cli, distributed


def main(argv: list[str] | None = None) -> None:
    distributed.exit_process(*cli.execute(argv))


if __name__ == "__main__":
    main()
