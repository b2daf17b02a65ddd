"""``python -m tests.gpu_check``: the GPU acceptance check (see `tests.gpu_check`)."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        import torch  # noqa: F401
    except ImportError as missing:  # the machine's python3 without torch: say which interpreter, in one line
        print(f"gpu-check: {sys.executable} cannot import torch ({missing}); set PYTHON to an interpreter that has "
              "torch, torchvision and pytest", file=sys.stderr)
        return 2
    from tests.gpu_check import run

    return run.main()


if __name__ == "__main__":
    sys.exit(main())
