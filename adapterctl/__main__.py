"""``python -m adapterctl`` (what torchrun launches: ``torchrun --nproc_per_node N -m adapterctl train ...``)."""

from adapterctl.cli import app

app()
