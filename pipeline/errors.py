"""The errors a user can fix, as opposed to lost workers and bugs.

A :class:`UserError` is deterministic: a damaged shard, a checkpoint that cannot be used, a bad value. The
same input fails the same way on every attempt, so jobs end at once with its one line (exit 2) instead of
spending ``compute.max_failures`` restarts on it (pipeline.cluster.user_error finds it also when it
reaches the driver wrapped in Ray's errors). Only a lost worker or node is worth a restart.
"""
from __future__ import annotations


class UserError(Exception):
    """A deterministic error whose message says what is wrong and names the file or field."""


class DataError(UserError, ValueError):
    """A token shard (or another input record) is damaged or disagrees with its manifest."""


class CheckpointError(UserError, ValueError):
    """No usable checkpoint where one was asked for (damaged, missing, refused)."""
