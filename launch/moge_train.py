"""Entry script for launchers that start a file, not a module (DeepSpeed's slurm and mpich runners
drop or mangle --module). Equivalent to ``python -m moge_ds.train``."""

from moge_ds.train import cli

if __name__ == "__main__":
    cli()
