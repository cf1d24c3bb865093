"""Imported at start-up by the `hf-soup` subprocesses that the Hub tests run (`test_hub.hub_env` puts this folder on
PYTHONPATH): huggingface_hub's retries still happen, each one as it would, but its backoff waits (1, 2, 4, 8, 8 s)
last at most 10 ms. Product code is not changed: the waits are the client's own `time.sleep` calls."""

import time

_sleep = time.sleep


def _short_sleep(seconds: float) -> None:
    _sleep(min(seconds, 0.01))


time.sleep = _short_sleep
