"""The chapter's reference loop, visible in bench/: it lives in ``resnetlab.bench.reference`` (so that
``resnetlab bench`` has it when installed) and this file re-exports it and runs its ``main``:
``python bench/reference.py --epochs 2 --subset 2048`` trains the D2L chapter's way."""
from resnetlab.bench.reference import *  # noqa: F401,F403  (the reference itself: DataLoader + PIL, train_ch6)
from resnetlab.bench.reference import main

if __name__ == "__main__":
    raise SystemExit(main())
