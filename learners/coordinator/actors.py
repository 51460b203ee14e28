"""The coordinator's record of its rollout actors, read from their ActorReports: each one's pid (a new pid for the
same actor means Ray restarted it), restarts per learner, and the state its last counted rollout left (what a
checkpoint keeps, and what a restarted actor is given back)."""

from __future__ import annotations

import logging

from learners.records import ActorReport

log = logging.getLogger("mdpo")


class ActorBook:
    def __init__(self, num_learners: int, num_actors: int):
        self.restarts = [0] * num_learners
        self.pids: list[list] = [[None] * num_actors for _ in range(num_learners)]
        self.states: list[list] = [[{}] * num_actors for _ in range(num_learners)]

    def observe(self, reports: list[ActorReport]) -> list[tuple[int, int, dict]]:
        """Take an iteration's reports; returns the restarted actors with the state to give back, as
        (learner, actor, state)."""
        restore = []
        for r in reports:
            i, a = r.learner_id, r.actor_id
            known = self.pids[i][a]
            if known is not None and r.pid != known:
                self.restarts[i] += 1
                log.warning("rollout actor %d/%d was restarted (pid %s -> %s); restarts so far: %d",
                            i, a, known, r.pid, sum(self.restarts))
                if self.states[i][a]:
                    restore.append((i, a, self.states[i][a]))
            else:
                self.states[i][a] = r.state
            self.pids[i][a] = r.pid
        return restore
