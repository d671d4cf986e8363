"""distributed.py's list helpers, which every rank split in the trainers goes through: ``share``
gives contiguous parts that differ by at most one, ``gather`` puts them back in order, and
``lockstep`` makes every rank call its function as often as the busiest rank (FSDP's forwards
gather weights from all ranks), dropping the stand-in calls' results."""

from conftest import run_ranks


def split_and_join(rank, world):
    import distributed

    out = {}
    for n in (0, 1, 2, 3, 7):
        items = list(range(n))
        out[n] = (distributed.share(items), distributed.gather(distributed.share(items)))
    calls = []

    def double(chunk):
        calls.append(list(chunk))
        return [2 * x for x in chunk]

    mine = distributed.share(list(range(5)))  # 2 or 3 items per rank
    doubled = distributed.lockstep(double, mine, 2, stand_in=-1)
    return out, doubled, calls


def test_share_gather_and_lockstep_on_two_ranks(tmp_path):
    (out0, doubled0, calls0), (out1, doubled1, calls1) = run_ranks(split_and_join, 2, tmp_path)
    for n, ((mine0, all0), (mine1, all1)) in {n: (out0[n], out1[n]) for n in out0}.items():
        assert mine0 == list(range(n))[: n // 2] and mine1 == list(range(n))[n // 2 :]  # rank r: n*r//W ..
        assert all0 == all1 == list(range(n))
    # rank 0 holds [0, 1], rank 1 [2, 3, 4]: two calls each, rank 0's second on the stand-in
    assert calls0 == [[0, 1], [-1]] and calls1 == [[2, 3], [4]]
    assert doubled0 == [0, 2] and doubled1 == [4, 6, 8]
