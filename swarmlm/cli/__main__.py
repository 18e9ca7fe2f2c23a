"""`python -m swarmlm.cli`: what the launchers and tests run (the `swarmlm` script runs the same app)."""

from swarmlm.cli import app

app()
