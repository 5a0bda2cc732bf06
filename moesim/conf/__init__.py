"""Hydra configs of the commands (package data): `<command>.yaml` plus groups such as strategy/."""
