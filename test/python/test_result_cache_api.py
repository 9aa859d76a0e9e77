"""custom_bn.result_cache: the cache of freed large CPU results can be seen and released, and a
process that forks while another thread is using the cache does not deadlock (a DataLoader
worker forks so)."""

import os
import threading
import time

import custom_bn
import pytest
import torch

ops = torch.ops.custom_bn


def large_result():
    """A training output of 16 MB, above the size the cache starts at. The input is not
    random: a child forked while another thread draws random numbers would wait for torch's
    generator lock forever."""
    x = torch.arange(8 * 32 * 128 * 128, dtype=torch.float32).reshape(8, 32, 128, 128) % 7
    return ops.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)


def test_freed_results_are_cached_until_emptied():
    custom_bn.result_cache.empty_cache()
    assert custom_bn.result_cache.cached_bytes() == 0
    out = large_result()
    assert custom_bn.result_cache.cached_bytes() == 0, "a live result is not cached"
    nbytes = out.nbytes
    del out
    assert custom_bn.result_cache.cached_bytes() >= nbytes
    again = large_result()  # reuses the cached block
    assert custom_bn.result_cache.cached_bytes() == 0
    del again
    custom_bn.result_cache.empty_cache()
    assert custom_bn.result_cache.cached_bytes() == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_uses_the_cache_does_not_deadlock():
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            large_result()

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(5):
            time.sleep(0.05)
            pid = os.fork()
            if pid == 0:  # the child: one op through the cache, then leave at once
                try:
                    torch.set_num_threads(1)
                    ok = large_result().shape == (8, 32, 128, 128)
                    custom_bn.result_cache.empty_cache()
                finally:
                    os._exit(0 if ok else 1)
            deadline = time.monotonic() + 60
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert os.waitstatus_to_exitcode(status) == 0
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail("the forked child deadlocked on the result cache")
                time.sleep(0.05)
    finally:
        stop.set()
        worker.join()
