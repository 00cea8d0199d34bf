"""The inference thread on its own (no HTTP): continuous batching, stops, limits, cancellation.
Real engine, the server tests' tiny model."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from bitnetd_trio.engine.inference import EngineSettings, InferenceThread, Job, Update
from bitnetd_trio.engine.native import ModelLoadError
from bitnetd_trio.engine.sampling import SamplingParams

LONG = 16000  # max_tokens of jobs meant to keep running (cancelled by the test)


@pytest.fixture
async def thread(server_model_path: Path) -> AsyncIterator[InferenceThread]:
    it = InferenceThread(
        EngineSettings(str(server_model_path), n_slots=2, n_ctx=16384, n_threads=1), max_queue=4
    )
    await it.start()
    try:
        yield it
    finally:
        await it.aclose()


def new_job(prompt: list[int], **kw: object) -> tuple[Job, trio.MemoryReceiveChannel]:
    send, recv = trio.open_memory_channel[Update](math.inf)
    params = kw.pop("params", SamplingParams(temperature=0.0))
    return Job(prompt=prompt, params=params, sink=send, **kw), recv  # type: ignore[arg-type]


async def finish(recv: trio.MemoryReceiveChannel) -> tuple[list[Update], Update]:
    got = []
    async for upd in recv:
        got.append(upd)
        if upd.final:
            return got, upd
    raise AssertionError("channel ended without a final update")


async def test_decoding_continues_while_a_long_prompt_prefills(thread: InferenceThread) -> None:
    a, ra = new_job([1, 2, 3], max_tokens=LONG, ignore_eos=True, logprobs=True)
    thread.submit([a])
    await ra.receive()  # A is decoding
    long_prompt = [(7 * i) % 250 + 1 for i in range(2000)]  # several prefill steps
    b, rb = new_job(long_prompt, max_tokens=1, ignore_eos=True)
    thread.submit([b])
    a_tokens_meanwhile = 0
    b_done = trio.Event()

    async def watch_b() -> None:
        await finish(rb)
        b_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_b)
        while not b_done.is_set():
            upd = await ra.receive()
            a_tokens_meanwhile += len(upd.tokens or [])
            assert not upd.final, "A ended before B's prompt was in"
        # A's tokens from the steps up to B's end were handed over with B's end
        while True:
            try:
                a_tokens_meanwhile += len(ra.receive_nowait().tokens or [])
            except trio.WouldBlock:
                break
        a.cancel.set()
    # A produced a token in every step of B's prefill, not one long stall
    assert a_tokens_meanwhile >= len(long_prompt) // thread.settings.prefill_budget


async def test_cancelled_waiting_job_never_takes_a_slot(thread: InferenceThread) -> None:
    runners = [new_job([1, 2], max_tokens=LONG, ignore_eos=True) for _ in range(2)]
    thread.submit([j for j, _ in runners])
    for _, r in runners:
        await r.receive()
    waiting, rw = new_job([5, 6], max_tokens=5)
    thread.submit([waiting])
    assert thread.queue_length() == 1
    waiting.cancel.set()
    _, final = await finish(rw)
    assert final.finish_reason == "cancelled" and final.n_generated == 0
    assert all(s.job_id != waiting.id for s in thread.snapshot_slots())
    for j, r in runners:
        j.cancel.set()
        _, f = await finish(r)
        assert f.finish_reason == "cancelled"
    assert thread.in_system == 0
    assert not any(s.busy for s in thread.snapshot_slots())


async def test_max_tokens_zero_and_context_end(server_model_path: Path) -> None:
    it = InferenceThread(EngineSettings(str(server_model_path), n_slots=1, n_ctx=64, n_threads=1))
    await it.start()
    try:
        j, r = new_job([1, 2, 3], max_tokens=0)
        it.submit([j])
        _, f = await finish(r)
        assert f.finish_reason == "length" and f.n_generated == 0
        prompt = list(range(1, 61))
        j, r = new_job(prompt, max_tokens=None, ignore_eos=True)
        it.submit([j])
        _, f = await finish(r)
        # the context holds 64 positions: the prompt's 60, then tokens until it is full
        assert f.finish_reason == "length" and f.n_generated == 64 - 60 + 1
    finally:
        await it.aclose()


async def test_min_tokens_and_ignore_eos(thread: InferenceThread) -> None:
    eot = thread.tokenizer.eot_id
    assert eot is not None
    forced = SamplingParams(temperature=0.0, logit_bias={eot: 100.0})
    j, r = new_job([1, 2, 3], max_tokens=50, params=forced)
    thread.submit([j])
    _, f = await finish(r)
    assert f.finish_reason == "stop" and f.stop_type == "eos" and f.n_generated == 1
    j, r = new_job([1, 2, 3], max_tokens=50, min_tokens=4, params=forced)
    thread.submit([j])
    _, f = await finish(r)
    assert f.finish_reason == "stop" and f.n_generated == 5  # 4 forced past EOT, then EOT
    j, r = new_job([1, 2, 3], max_tokens=20, ignore_eos=True, params=forced)
    thread.submit([j])
    _, f = await finish(r)
    assert f.finish_reason == "length" and f.n_generated == 20


async def test_queue_full(thread: InferenceThread) -> None:
    from bitnetd_trio.engine.inference import QueueFull

    jobs = [new_job([1], max_tokens=LONG, ignore_eos=True) for _ in range(6)]  # 2 slots + 4
    thread.submit([j for j, _ in jobs])
    extra, _ = new_job([1], max_tokens=1)
    with pytest.raises(QueueFull):
        thread.submit([extra])
    for j, _ in jobs:
        j.cancel.set()
    for _, r in jobs:
        await finish(r)
    assert thread.in_system == 0


async def test_more_sequences_than_slots_plus_queue_never_fit(thread: InferenceThread) -> None:
    from bitnetd_trio.engine.inference import QueueFull

    assert thread.capacity == 6  # 2 slots + max_queue 4
    with pytest.raises(QueueFull):  # not even into an idle engine
        thread.submit([new_job([1], max_tokens=1)[0] for _ in range(7)])
    assert thread.in_system == 0
    jobs = [new_job([1], max_tokens=1) for _ in range(6)]
    thread.submit([j for j, _ in jobs])
    for _, r in jobs:
        assert (await finish(r))[1].finish_reason == "length"
    assert thread.in_system == 0


async def test_a_sequence_whose_logits_are_all_nan_fails_alone(
    tmp_path: Path, server_model_path: Path
) -> None:
    """A broken model (NaN in one embedding row; the loader does not scan the 650 MB of F16
    data) makes sampling impossible for sequences that read that row: those end with an
    error, the others in the same steps finish normally, and the thread keeps serving."""
    import numpy as np

    from bitnetd_trio.engine import gguf_writer as gw
    shape = dataclasses.replace(gw.TINY, n_ctx=256)
    embd = gw.random_weights(shape, seed=3)["token_embd.weight"].copy()
    embd[7, :] = np.nan
    path = gw.write_model(tmp_path / "nan.gguf", shape, seed=3,
                          tensor_overrides={"token_embd.weight": embd})
    it = InferenceThread(EngineSettings(str(path), n_slots=2, n_ctx=256, n_threads=1),
                         max_queue=4)
    await it.start()
    try:
        good, rgood = new_job([1, 2, 3], max_tokens=5, ignore_eos=True)
        bad, rbad = new_job([1, 7], max_tokens=5, ignore_eos=True)
        it.submit([good, bad])
        _, bad_end = await finish(rbad)
        _, good_end = await finish(rgood)
        assert bad_end.finish_reason == "error" and "NaN" in (bad_end.error or "")
        assert good_end.finish_reason == "length" and good_end.n_generated == 5
        again, ragain = new_job([4, 5], max_tokens=3, ignore_eos=True)
        it.submit([again])
        _, again_end = await finish(ragain)
        assert again_end.finish_reason == "length"
    finally:
        await it.aclose()


async def test_a_job_whose_admission_fails_ends_alone(thread: InferenceThread) -> None:
    """Fault injection: the first stream decoder the thread asks for raises. That job gets a
    final error, the job admitted beside it runs normally, and no slot is lost."""
    real = thread.tokenizer.stream_decoder
    calls = []

    def failing_once():  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real()

    thread.tokenizer.stream_decoder = failing_once  # type: ignore[method-assign]
    a, ra = new_job([1, 2, 3], max_tokens=4, ignore_eos=True)
    b, rb = new_job([4, 5, 6], max_tokens=4, ignore_eos=True)
    thread.submit([a, b])
    with trio.fail_after(30):  # without the fix, a's final update never comes
        _, a_end = await finish(ra)
        _, b_end = await finish(rb)
    assert a_end.finish_reason == "error" and "injected" in (a_end.error or "")
    assert b_end.finish_reason == "length" and b_end.n_generated == 4
    # both slots still usable: two more jobs run side by side
    c, rc = new_job([7, 8], max_tokens=3, ignore_eos=True)
    d, rd = new_job([9, 10], max_tokens=3, ignore_eos=True)
    thread.submit([c, d])
    assert (await finish(rc))[1].finish_reason == "length"
    assert (await finish(rd))[1].finish_reason == "length"
    assert thread.in_system == 0


# ---- lifetime -------------------------------------------------------------------------------


async def test_as_a_context_manager_it_serves_inside_and_is_joined_at_exit(
    server_model_path: Path,
) -> None:
    settings = EngineSettings(str(server_model_path), n_slots=1, n_ctx=256, n_threads=1)
    async with InferenceThread(settings) as it:
        assert it.ready
        j, r = new_job([1, 2, 3], max_tokens=3, ignore_eos=True)
        it.submit([j])
        _, end = await finish(r)
        assert end.finish_reason == "length"
        running, r_running = new_job([1, 2], max_tokens=LONG, ignore_eos=True)
        it.submit([running])
        await r_running.receive()
    assert not it.ready and it._thread is not None and not it._thread.is_alive()
    # the job still running at exit ends with an error instead of hanging its client
    with trio.fail_after(5):
        _, end = await finish(r_running)
    assert end.finish_reason == "error"


async def test_a_cancelled_body_still_stops_and_joins_the_thread(server_model_path: Path) -> None:
    settings = EngineSettings(str(server_model_path), n_slots=1, n_ctx=256, n_threads=1)
    it = InferenceThread(settings)
    with trio.CancelScope() as scope:
        async with it:
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert it._thread is not None and not it._thread.is_alive()


async def test_a_load_error_is_raised_by_the_context_manager(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is not GGUF")
    it = InferenceThread(EngineSettings(str(bad), n_slots=1, n_threads=1))
    with pytest.raises(ModelLoadError, match="GGUF"):
        async with it:
            raise AssertionError("the body must not run")
    assert not it.ready and it._thread is not None and not it._thread.is_alive()


async def test_wait_idle_returns_when_the_last_job_has_finished(thread: InferenceThread) -> None:
    with trio.fail_after(1):
        await thread.wait_idle()  # nothing submitted: at once
    jobs = [new_job([1, 2], max_tokens=LONG, ignore_eos=True) for _ in range(3)]
    thread.submit([j for j, _ in jobs])
    idle = trio.Event()

    async def waiter() -> None:
        await thread.wait_idle()
        idle.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(waiter)  # two waiters share the wake-up
        for j, r in jobs:
            await r.receive()
            await trio.sleep(0.01)
            assert not idle.is_set()
            j.cancel.set()
        with trio.fail_after(10):
            await idle.wait()
    assert thread.in_system == 0
