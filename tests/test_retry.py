"""The front's model-call policy (deploykit/serving/retry.py): real coroutines and real aiohttp exceptions."""

import asyncio

import aiohttp
import pytest

from deploykit.serving.retry import call_with_retries


def scripted(*outcomes):
    """make_call for call_with_retries: each call plays the next outcome (a value, an exception, or 'stall')."""
    calls = []

    def make_call():
        outcome = outcomes[len(calls)]
        calls.append(outcome)

        async def run():
            if outcome == "stall":
                await asyncio.sleep(3600)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        return run()
    return make_call, calls


def run(make_call, retries=2, timeout_s=0.05):
    logs = []
    result = asyncio.run(call_with_retries(make_call, timeout_s=timeout_s, retries=retries, log=logs.append))
    return result, logs


def test_a_stalled_call_is_abandoned_and_retried():
    make_call, calls = scripted("stall", 7)
    result, logs = run(make_call)
    assert result == 7 and len(calls) == 2
    assert logs == ["model call dropped (no answer in 0.05 s), retry 1/2"]


def test_dropped_connections_are_retried_up_to_the_limit():
    make_call, calls = scripted(aiohttp.ServerDisconnectedError(), RuntimeError("Connection closed."), 3)
    assert run(make_call)[0] == 3 and len(calls) == 3
    make_call, calls = scripted(aiohttp.ServerDisconnectedError(), aiohttp.ServerDisconnectedError(), 3)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        run(make_call, retries=1)
    assert len(calls) == 2


def test_model_errors_are_not_retried():
    make_call, calls = scripted(ValueError("bad input shape"), 1)
    with pytest.raises(ValueError, match="bad input shape"):
        run(make_call)
    make_call, calls2 = scripted(RuntimeError("ORT failed"), 1)
    with pytest.raises(RuntimeError, match="ORT failed"):
        run(make_call)
    assert len(calls) == len(calls2) == 1


def test_a_call_that_always_stalls_fails_after_all_attempts():
    make_call, calls = scripted("stall", "stall", "stall")
    with pytest.raises(asyncio.TimeoutError):
        run(make_call)
    assert len(calls) == 3
