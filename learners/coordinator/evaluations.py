"""Evaluation on unseen levels without blocking the loop: each learner's latest weights go to the Evaluator hosted
by its actor 0 (actors/evaluator.py), at most one evaluation per learner in flight, results picked up when ready."""

from __future__ import annotations

import logging

import ray

log = logging.getLogger("mdpo")


class Evaluations:
    def __init__(self, num_learners: int):
        self.last: list[dict | None] = [None] * num_learners    # per learner, the latest finished evaluation
        self.in_flight: dict = {}                               # Ray reference -> learner

    def launch(self, evaluators: list, learners: list) -> None:
        for i, evaluator in enumerate(evaluators):
            if i not in self.in_flight.values():
                self.in_flight[evaluator.evaluate.remote(learners[i].weights.remote())] = i

    def poll(self, timeout: float = 0) -> None:
        if not self.in_flight:
            return
        ready, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=timeout)
        for ref in ready:
            i = self.in_flight.pop(ref)
            try:
                self.last[i] = ray.get(ref)
            except ray.exceptions.RayError as err:
                # Best effort: the host actor is restarted by Ray (or replaced by the failure handling), and the
                # next evaluation goes to it.
                log.warning("evaluation of learner %d failed (%s); the next one goes on", i, type(err).__name__)

    def final(self, evaluators: list, learners: list, timeout: float = 600) -> None:
        """The summary's test return is that of the final weights: wait for one last evaluation."""
        if not evaluators:
            return
        self.poll(timeout)          # let in-flight evaluations finish first
        self.launch(evaluators, learners)
        self.poll(timeout)
