"""The DHT's key names, in one place: every package that stores or reads a record agrees on them here."""

from __future__ import annotations

TRAINING_KEY = "swarmlm.training"  # one subkey per training run (its round and loss curve), read by the dashboard


def training_start_key(run_id: str) -> str:
    """The peers of a training run that are ready for its first round, one subkey per peer id."""
    return f"swarmlm:train:{run_id}:start"


def model_key(model_id: str) -> str:
    """Serving peers' span records for `model_id`, one subkey per peer id."""
    return f"swarmlm:{model_id}:spans"


def members_key(swarm_id: str) -> str:
    """A private swarm's membership certificates, one subkey per member."""
    return f"swarmlm:swarm:{swarm_id}:members"
