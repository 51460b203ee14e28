import numpy as np

from learners.schedule import IterationPlan


def plan(sync, distill=True):
    return IterationPlan(iteration=3, shuffle_seed=11, batch_size=64, num_minibatches=4, update_epochs=3,
                         sync=sync, distill=distill, learning_rate=1e-3)


def test_same_seed_same_permutation_and_each_epoch_differs():
    a, b = plan("minibatch"), plan("minibatch")
    np.testing.assert_array_equal(a.permutation(0), b.permutation(0))
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    assert sorted(a.permutation(2)) == list(range(64))


def test_sync_points_per_schedule():
    assert plan("minibatch").sync_points() == 12
    assert plan("epoch").sync_points() == 3
    assert plan("iteration").sync_points() == 1
    assert plan("2").sync_points() == 6
    assert plan("3").sync_points() == 6      # minibatches 0 and 3 of each epoch
    assert plan("minibatch", distill=False).sync_points() == 0


def test_windows_cover_exactly_the_minibatches_until_the_next_sync():
    p = plan("3")
    perm = p.permutation(1)
    np.testing.assert_array_equal(p.sync_window(1, 0, perm), perm[:48])
    assert p.sync_window(1, 1, perm) is None
    np.testing.assert_array_equal(p.sync_window(1, 3, perm), perm[48:])
    np.testing.assert_array_equal(plan("epoch").sync_window(2, 0, perm), np.arange(64))
    assert plan("iteration").sync_window(1, 0, perm) is None
