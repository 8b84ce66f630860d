"""Offline evaluation commands (`appliance eval ...`): accuracy of our models against peers, same run."""
