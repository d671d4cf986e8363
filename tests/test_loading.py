"""Loading once: on several ranks only rank 0 holds the whole model (``models.build_sharded``);
the others build it on the meta device and receive their shards. Checked against each rank
loading the whole model itself, as before: the same weights bitwise, and host memory per rank of
about a shard, not a model."""

import resource

import torch

from conftest import make_cfg, run_ranks

BIG = ["model.init.hidden_size=512", "model.init.intermediate_size=1536", "model.init.num_hidden_layers=12"]


def local_weights(rank, world, overrides, loss):
    """This rank's shard of every parameter and its buffers, loaded by build_sharded (2 ranks) or
    by the one process (1 rank, the plain load)."""
    import distributed
    import models

    cfg = make_cfg(f"loss={loss}", *overrides)
    load = models.load_reward_model if loss == "rm" else models.load_model
    model = models.build_sharded(lambda meta: load(cfg.model, distributed.device(), seed=cfg.seed, meta=meta),
                                 distributed.mesh(), distributed.device())
    params = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    return params, {n: b.clone() for n, b in model.named_buffers()}


def test_two_ranks_hold_shards_of_the_weights_one_process_loads(tmp_path):
    """Random init (drawn on rank 0), a reward model (its one-row head: rank 1's shard is empty)
    and pretrained weights read from a directory; an odd vocabulary splits the embedding unevenly."""
    import models

    cfg = make_cfg("model.init.vocab_size=263")
    pretrained = tmp_path / "pretrained"
    models.load_model(cfg.model, torch.device("cpu"), seed=7).save_pretrained(pretrained)
    models.load_tokenizer(cfg.model).save_pretrained(pretrained)
    cases = (("sft", ["model.init.vocab_size=263"]), ("rm", ["model.init.vocab_size=263"]),
             ("sft", [f"model.archive={pretrained}"]))
    for loss, overrides in cases:
        (whole, whole_buffers), = run_ranks(local_weights, 1, tmp_path, overrides, loss)
        for rank, (mine, buffers) in enumerate(run_ranks(local_weights, 2, tmp_path, overrides, loss)):
            assert mine.keys() == whole.keys()
            for name, full in whole.items():
                parts = torch.chunk(full, 2)  # FSDP2's Shard(0) splits as torch.chunk does
                expected = parts[rank] if rank < len(parts) else full[:0]
                assert torch.equal(mine[name], expected), (loss, rank, name)
            assert all(torch.equal(buffers[n], b) for n, b in whole_buffers.items())


def load_memory(rank, world, whole: bool):
    """(peak RSS growth while loading, the model's fp32 bytes) on this rank; ``whole``: every rank
    loads the whole model (the path cpu_offload takes, and every run's before build_sharded)."""
    import distributed
    import models

    cfg = make_cfg(*BIG)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = models.build_sharded(lambda meta: models.load_model(cfg.model, distributed.device(), meta=meta),
                                 distributed.mesh(), distributed.device(), cpu_offload=whole)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return grown, 4 * sum(p.numel() for p in model.parameters())  # the global DTensors' sizes


def test_only_rank_0_holds_the_whole_model_while_loading(tmp_path):
    """A 38M-parameter model (152 MB in fp32): rank 0 reads it whole; rank 1 grows by about its
    shard (half the model) and transients, less than one model, where loading the whole model on
    each rank grows it by more than the model."""
    (grown0, size), (grown1, _) = run_ranks(load_memory, 2, tmp_path, False)
    (_, _), (whole1, _) = run_ranks(load_memory, 2, tmp_path, True)
    assert size > 150e6
    assert grown0 > size and whole1 > size  # the measure sees a whole model where there is one
    # measured: 115 MB (a 76 MB shard and transients) against 184 MB loading the whole model
    assert grown1 < size and grown1 < 0.7 * whole1, (f"rank 1 grew by {grown1 / 1e6:.0f} MB loading a "
                                                     f"{size / 1e6:.0f} MB model ({whole1 / 1e6:.0f} MB loading it whole)")
