"""`python -m secateurs ...`: the command line, also as `torchrun --nproc-per-node N -m secateurs prune ...`."""

from secateurs.cli import main

raise SystemExit(main())
