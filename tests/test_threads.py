"""Threads: one pipeline called from four threads at once gives exactly the images of four serial calls.

Each call works on its own copy of the scheduler and its own generator; ONNX Runtime sessions are
safe to run concurrently. Exact equality is the claim: the same process, the same kernels and the
same inputs, so nothing but a shared state could make a difference.
"""

from __future__ import annotations

import threading

import numpy as np


def test_four_threads_equal_four_serial_calls(tiny_export):
    from sdort.runtime import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from sdort.schedulers import EulerAncestralDiscreteScheduler

    pipe = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    # An ancestral scheduler draws noise every step: a shared generator or step counter would show.
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    start = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    jobs = [
        (pipe, dict(prompt="a red fox", generator=1)),
        (pipe, dict(prompt="a castle on a hill", negative_prompt="blurry", generator=2, num_images_per_prompt=2)),
        (img2img, dict(prompt="an oil painting", image=start, strength=0.7, generator=3)),
        (pipe, dict(prompt="a lighthouse", generator=4, guidance_scale=1.0)),
    ]

    def run(job):
        call, kwargs = job
        return call(num_inference_steps=6, output_type="np", **kwargs).images

    serial = [run(job) for job in jobs]
    threaded = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        barrier.wait()  # all four start together
        threaded[i] = run(jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({image.tobytes() for image in serial}) == 4, "the four jobs must differ for the test to mean anything"
    for i, (expected, got) in enumerate(zip(serial, threaded)):
        assert got is not None and np.array_equal(got, expected), f"job {i} differs when run in a thread"
